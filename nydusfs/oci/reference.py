"""Image references: ``[http://|https://][docker://]host[:port]/repo[:tag][@sha256:...]`` and
``oci:DIR[:tag]`` (an OCI image layout directory, skopeo's spelling).

A name without a registry host (``ubuntu``, ``library/ubuntu:22.04``) means Docker Hub, as
docker and nydusify read it: host ``registry-1.docker.io``, ``library/`` added to one-part
names. The first component is a host when it has a ``.`` or a ``:`` or is ``localhost``. A
scheme prefix fixes the protocol; without one, https is tried first and, for an insecure
registry, http after a TLS failure (the registry backend's fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nydusfs.errors import ConfigError

DOCKER_HUB = "registry-1.docker.io"
DEFAULT_TAG = "latest"
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed reference. For a layout, ``layout`` is the directory and ``host``/``repo`` are
    empty; ``tag`` names the image in the layout's index."""

    host: str = ""
    repo: str = ""
    tag: str = DEFAULT_TAG
    digest: str | None = None
    scheme: str = ""  # "http", "https" or "" (https, http fallback when insecure)
    layout: str | None = None

    @property
    def is_layout(self) -> bool:
        return self.layout is not None

    @property
    def reference(self) -> str:
        """What the registry's manifest URL takes: the digest if given, else the tag."""
        return self.digest or self.tag

    def with_tag(self, tag: str) -> ImageRef:
        return ImageRef(self.host, self.repo, tag, None, self.scheme, self.layout)

    def __str__(self) -> str:
        if self.layout is not None:
            return f"oci:{self.layout}:{self.tag}"
        scheme = f"{self.scheme}://" if self.scheme else ""
        suffix = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{scheme}{self.host}/{self.repo}{suffix}"


def parse_reference(text: str) -> ImageRef:
    """Parse ``text``; ``ConfigError`` naming what is wrong with it."""
    raw = text.strip()
    if not raw:
        raise ConfigError("empty image reference")
    if raw.startswith("oci:"):
        path, sep, tag = raw[4:].rpartition(":")
        if not sep or "/" in tag:
            path, tag = raw[4:], DEFAULT_TAG
        if not path:
            raise ConfigError(f"image reference {text!r}: no layout directory after 'oci:'")
        if not _TAG.match(tag):
            raise ConfigError(f"image reference {text!r}: invalid tag {tag!r}")
        return ImageRef(tag=tag, layout=path)
    scheme = ""
    for prefix in ("http://", "https://"):
        if raw.startswith(prefix):
            scheme, raw = prefix[:-3], raw[len(prefix) :]
    raw = raw.removeprefix("docker://")
    name, at, digest = raw.partition("@")
    if at and not _DIGEST.match(digest):
        raise ConfigError(f"image reference {text!r}: invalid digest {digest!r}")
    tag = DEFAULT_TAG
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.match(tag):
            raise ConfigError(f"image reference {text!r}: invalid tag {tag!r}")
    parts = name.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        host, repo_parts = first, parts[1:]
        if not _HOST.match(host):
            raise ConfigError(f"image reference {text!r}: invalid registry host {host!r}")
    else:
        host, repo_parts = DOCKER_HUB, parts
        if len(repo_parts) == 1:
            repo_parts = ["library", *repo_parts]
    for part in repo_parts:
        if not _REPO_COMPONENT.match(part):
            raise ConfigError(
                f"image reference {text!r}: invalid repository component {part!r} "
                "(lower-case letters, digits and separators)"
            )
    return ImageRef(host, "/".join(repo_parts), tag, digest or None, scheme)
