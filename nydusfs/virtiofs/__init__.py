"""virtio-fs over vhost-user: serve a ``FileSystem`` to QEMU guests (``vhost-user-fs-pci``).

``memory`` maps the guest's RAM from the fds QEMU passes, ``virtqueue`` walks split rings,
``vhost_user`` speaks the control protocol on the unix socket and ``device`` is the virtio-fs
device that hands each request to ``nydusfs.fuse.server.FuseServer``.
"""
