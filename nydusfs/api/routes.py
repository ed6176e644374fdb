"""The API's routes: upstream's ``HTTP_ROUTES`` and what ``api_server_glue.rs`` does for each.

=================================  ============  ===============================================
route                              methods       effect
=================================  ============  ===============================================
/api/v1/daemon                     GET, PUT      DaemonInfo; ``{"log_level"}`` sets the level
/api/v1/daemon/events              GET           the latest ERROR log records (ring buffer)
/api/v1/daemon/backend             GET           the image of ``?mountpoint=`` (RafsSuperMeta)
/api/v1/daemon/exit                PUT           state STOPPED, reply 204, then stop (unmount)
/api/v1/daemon/start               PUT           the Start event (READY -> RUNNING)
/api/v1/daemon/fuse/sendfd         PUT           501: hot upgrade is not in this build
/api/v1/daemon/fuse/takeover       PUT           501, as sendfd
/api/v1/mount?mountpoint=          POST/PUT/DEL  mount / remount / umount a RAFS image
/api/v1/metrics[?id=]              GET           FsIoStats of one mount
/api/v1/metrics/files[?id=&latest] GET           per-inode counters, or the latest read inodes
/api/v1/metrics/pattern[?id=]      GET           access pattern records
/api/v1/metrics/backend[?id=]      GET           BackendMetrics
/api/v1/metrics/blobcache[?id=]    GET           BlobcacheMetrics
/api/v1/metrics/inflight           GET           FUSE requests being served; 204 when idle
/api/v1/metrics/prometheus         GET           all counters as Prometheus text (ours)
/api/v1/config[?id=]               GET, PUT      runtime ``registry_auth`` (hot reload)
/api/v2/daemon                     GET, PUT      DaemonInfo without backend_collection
/api/v2/blobs                      GET/PUT/DEL   501: blob cache entries (singleton mode)
=================================  ============  ===============================================

As upstream: an unknown path is 404 ``NoRoute``; a known path with another method, or with a
body where none is taken (or none where one is needed), is 400. Metrics ``id`` is a mountpoint
(or a config ``id``); without it a metrics route answers only when exactly one instance has
that counter, else 404 ``NoCounter``. Status codes per error kind: ``nydusfs.api.errors``.

Concurrency: handlers run on the daemon's loop in the connection's task. Mount, remount and
umount are serialized by ``FsService``; reads of counters do not await, so each reply is a
consistent snapshot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from nydusfs.api import prometheus
from nydusfs.api.errors import (
    ApiError,
    BadRequest,
    NoCounter,
    NoRoute,
    NotFound,
    NotReady,
    UnexpectedEvent,
    Unsupported,
    from_exception,
)
from nydusfs.api.server import Request, Response
from nydusfs.api.types import (
    UNSUPPORTED_CONFIG_KEYS,
    MountRequest,
    daemon_info,
    normalize_mountpoint,
    parse_config_update,
    parse_daemon_conf,
    super_meta,
)
from nydusfs.config import ConfigV2, load_config
from nydusfs.daemon.daemon import DaemonState
from nydusfs.daemon.fs_service import FS_TYPES, MountCmd, MountedFs
from nydusfs.errors import ConfigError
from nydusfs.storage.backends.auth import get_registry_auth, set_registry_auth

if TYPE_CHECKING:
    from nydusfs.daemon.daemon import Daemon

log = logging.getLogger(__name__)

T = TypeVar("T")
# The loggers a log_level change applies to: the library and the nydusd command, not the
# host program's other loggers when the daemon is embedded.
LOGGERS = ("nydusfs", "nydusd")


@dataclass(frozen=True, slots=True)
class Route:
    handler: Callable[[Request], Awaitable[Response]]
    body: bool  # True: a JSON body is required; False: none is allowed


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value).encode())


NO_CONTENT = 204


class ApiRoutes:
    """The request handler of a daemon's ``ApiServer``."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        g, p = "GET", "PUT"
        v1, v2 = "/api/v1", "/api/v2"
        self.routes: dict[str, dict[str, Route]] = {
            f"{v1}/daemon": {g: Route(self.info_v1, False), p: Route(self.configure, True)},
            f"{v1}/daemon/events": {g: Route(self.events, False)},
            f"{v1}/daemon/backend": {g: Route(self.backend_info, False)},
            f"{v1}/daemon/exit": {p: Route(self.exit, False)},
            f"{v1}/daemon/start": {p: Route(self.start, False)},
            f"{v1}/daemon/fuse/sendfd": {p: Route(self.upgrade, False)},
            f"{v1}/daemon/fuse/takeover": {p: Route(self.upgrade, False)},
            f"{v1}/mount": {
                "POST": Route(self.mount, True),
                p: Route(self.remount, True),
                "DELETE": Route(self.umount, False),
            },
            f"{v1}/metrics": {g: Route(self.fs_metrics, False)},
            f"{v1}/metrics/files": {g: Route(self.files_metrics, False)},
            f"{v1}/metrics/pattern": {g: Route(self.pattern_metrics, False)},
            f"{v1}/metrics/backend": {g: Route(self.backend_metrics, False)},
            f"{v1}/metrics/blobcache": {g: Route(self.blobcache_metrics, False)},
            f"{v1}/metrics/inflight": {g: Route(self.inflight_metrics, False)},
            f"{v1}/metrics/prometheus": {g: Route(self.prometheus_metrics, False)},
            f"{v1}/config": {g: Route(self.get_config, False), p: Route(self.put_config, True)},
            f"{v2}/daemon": {g: Route(self.info_v2, False), p: Route(self.configure, True)},
            f"{v2}/blobs": {
                g: Route(self.blobs, False),
                p: Route(self.blobs, True),
                "DELETE": Route(self.blobs, False),
            },
        }

    async def __call__(self, req: Request) -> Response:
        try:
            response = await self._route(req)
        except ApiError as e:
            level = logging.ERROR if e.status >= 500 else logging.WARNING
            log.log(level, "api: %s %s: %d %s", req.method, req.target, e.status, e.message)
            return Response(int(e.status), e.body())
        log.debug("api: %s %s: %d", req.method, req.target, response.status)
        return response

    async def _route(self, req: Request) -> Response:
        methods = self.routes.get(req.path)
        if methods is None:
            raise NoRoute(f"no API route {req.path}")
        route = methods.get(req.method)
        if route is None:
            allowed = ", ".join(methods)
            raise BadRequest(f"method {req.method} is not allowed on {req.path} ({allowed})")
        if route.body and not req.body:
            raise BadRequest(f"{req.method} {req.path} needs a JSON request body")
        if not route.body and req.body:
            raise BadRequest(f"{req.method} {req.path} takes no request body")
        return await route.handler(req)

    # --- daemon -------------------------------------------------------------------------------
    async def info_v1(self, req: Request) -> Response:
        return json_response(daemon_info(self.daemon, include_fs=True))

    async def info_v2(self, req: Request) -> Response:
        return json_response(daemon_info(self.daemon, include_fs=False))

    async def configure(self, req: Request) -> Response:
        level = parse_daemon_conf(req.body)
        for name in LOGGERS:
            logging.getLogger(name).setLevel(level)
        log.info("api: log level set to %s", logging.getLevelName(level))
        return Response(NO_CONTENT)

    async def events(self, req: Request) -> Response:
        return json_response(self.daemon.events.to_dict())

    async def exit(self, req: Request) -> Response:
        log.info("api: exit requested")
        self.daemon.request_exit()
        # Stop only once the 204 is on its way: stopping cancels this connection too.
        return Response(NO_CONTENT, after_send=self.daemon.stop)

    async def start(self, req: Request) -> Response:
        state = self.daemon.state
        if state is not DaemonState.READY:
            raise UnexpectedEvent(f"unexpected event Start in state {state.value}")
        # Serving starts by itself once the initial mounts are done; nothing else to do.
        return Response(NO_CONTENT)

    async def upgrade(self, req: Request) -> Response:
        raise Unsupported("hot upgrade and failover (sendfd/takeover) are not available")

    async def blobs(self, req: Request) -> Response:
        raise Unsupported("blob cache entries (singleton/fscache mode) are not available")

    async def backend_info(self, req: Request) -> Response:
        mountpoint = normalize_mountpoint(req.param("mountpoint"))
        mounted = self._mounted(mountpoint)
        if mounted.sup is None:
            raise Unsupported(f"{mountpoint} is a passthrough_fs mount: it has no RAFS metadata")
        return json_response(super_meta(mounted.sup, mountpoint))

    # --- mounts -------------------------------------------------------------------------------
    def _alive(self) -> None:
        if self.daemon.state is DaemonState.STOPPED:
            raise NotReady("the daemon is stopping")

    def _mounted(self, mountpoint: str) -> MountedFs:
        mounted = self.daemon.service.mounts.get(mountpoint)
        if mounted is None:
            raise NotFound(f"nothing is mounted at {mountpoint}")
        return mounted

    def _mount_cmd(self, req: Request) -> MountCmd:
        mountpoint = normalize_mountpoint(req.param("mountpoint"))
        body = MountRequest.parse(req.body)
        kind = FS_TYPES.get(body.fs_type)
        if kind is None:
            raise BadRequest(f"unknown fs_type {body.fs_type!r} (rafs or passthrough_fs)")
        try:
            if kind == "passthrough_fs" and not body.config.strip():
                config = ConfigV2()  # a shared directory needs no config
            else:
                config = load_config(body.config, strict=True)
        except ConfigError as e:
            raise BadRequest(f"invalid config: {e}") from None
        return MountCmd(kind, body.source, config, mountpoint, body.prefetch_files,
                        writable=self.daemon.writable)  # fmt: skip

    async def mount(self, req: Request) -> Response:
        cmd = self._mount_cmd(req)
        self._alive()
        try:
            await self.daemon.service.mount(cmd)
        except Exception as e:
            raise from_exception(e, f"mount {cmd.source} at {cmd.mountpoint}") from e
        return Response(NO_CONTENT)

    async def remount(self, req: Request) -> Response:
        cmd = self._mount_cmd(req)
        self._alive()
        try:
            await self.daemon.service.remount(cmd)
        except Exception as e:
            raise from_exception(e, f"remount {cmd.source} at {cmd.mountpoint}") from e
        return Response(NO_CONTENT)

    async def umount(self, req: Request) -> Response:
        mountpoint = normalize_mountpoint(req.param("mountpoint"))
        self._alive()
        try:
            await self.daemon.service.umount(mountpoint)
        except Exception as e:
            raise from_exception(e, f"umount {mountpoint}") from e
        return Response(NO_CONTENT)

    # --- metrics ------------------------------------------------------------------------------
    def _select(self, req: Request, kind: str, pick: Callable[[MountedFs], T | None]) -> T:
        """The counter of the instance ``?id=`` names, or of the only instance."""
        wanted = req.param("id")
        found = [
            (mp, m, v) for mp, m in self.daemon.service.mounts.items() if (v := pick(m)) is not None
        ]
        if wanted is None:
            if len(found) == 1:
                return found[0][2]
            names = ", ".join(mp for mp, _, _ in found) or "none"
            raise NoCounter(
                f"no {kind} counter selected: {len(found)} instances have one ({names}); "
                "name one with ?id=<mountpoint>"
            )
        for mp, mounted, value in found:
            if wanted in (mp, mounted.cmd.config.id) or _same_path(wanted, mp):
                return value
        raise NoCounter(f"no {kind} counter for id {wanted!r}")

    async def fs_metrics(self, req: Request) -> Response:
        stats = self._select(req, "filesystem", lambda m: m.fs.stats)
        return json_response(stats.to_dict())

    async def files_metrics(self, req: Request) -> Response:
        stats = self._select(req, "filesystem", lambda m: m.fs.stats)
        if req.param("latest") == "true":  # upstream: parse::<bool>, anything else is false
            return json_response(stats.take_latest_read())
        return json_response(stats.files_dict())

    async def pattern_metrics(self, req: Request) -> Response:
        stats = self._select(req, "filesystem", lambda m: m.fs.stats)
        return json_response(stats.pattern_list())

    async def backend_metrics(self, req: Request) -> Response:
        metrics = self._select(
            req, "backend", lambda m: m.backend.metrics if m.backend is not None else None
        )
        return json_response(metrics.to_dict())

    async def blobcache_metrics(self, req: Request) -> Response:
        metrics = self._select(
            req, "blobcache", lambda m: m.device.metrics if m.device is not None else None
        )
        return json_response(metrics.to_dict())

    async def inflight_metrics(self, req: Request) -> Response:
        if not len(self.daemon.inflight):
            return Response(NO_CONTENT)
        return json_response(self.daemon.inflight.to_list())

    async def prometheus_metrics(self, req: Request) -> Response:
        text = prometheus.render(self.daemon)
        return Response(200, text.encode(), content_type=prometheus.CONTENT_TYPE)

    # --- runtime config -----------------------------------------------------------------------
    async def get_config(self, req: Request) -> Response:
        auth = get_registry_auth(req.param("id"))
        return json_response({} if auth is None else {"registry_auth": auth})

    async def put_config(self, req: Request) -> Response:
        update = parse_config_update(req.body)
        unsupported = sorted(set(update) & set(UNSUPPORTED_CONFIG_KEYS))
        if unsupported:
            raise Unsupported(f"runtime config key {unsupported[0]!r} is not available")
        set_registry_auth(update["registry_auth"], req.param("id"))
        log.info("api: registry credentials updated for %s", req.param("id") or "every backend")
        return Response(NO_CONTENT)


def _same_path(a: str, b: str) -> bool:
    try:
        return normalize_mountpoint(a) == b
    except BadRequest:
        return False
