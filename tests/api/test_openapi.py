"""``nydusfs/api/openapi.yaml`` is a valid OpenAPI document and the live API conforms to it.

The daemon's API (``ApiRoutes`` of a ``Daemon`` with one RAFS image mounted in its VFS, no FUSE
frontend, so no root) is served in-process on a unix socket; schemathesis generates requests
for every operation, valid and invalid, and each reply must be documented (status, content
type, body schema) and never a server error (5xx other than a documented 501 Unsupported).
``PUT /api/v1/daemon/exit`` is not fuzzed: it is checked once, last.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("schemathesis")
yaml = pytest.importorskip("yaml")

import requests  # noqa: E402
import schemathesis  # noqa: E402
import trio  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from nydusfs.api.routes import LOGGERS, ApiRoutes  # noqa: E402
from nydusfs.api.server import ApiServer  # noqa: E402
from nydusfs.config import load_config  # noqa: E402
from nydusfs.daemon.daemon import Daemon, DaemonState  # noqa: E402
from nydusfs.daemon.fs_service import MountCmd  # noqa: E402
from nydusfs.storage.backends.auth import reset_registry_auth  # noqa: E402
from nydusfs.storage.backends.http import UnixSocketAdapter  # noqa: E402
from tests.api.daemon import make_image, mount_config, write_tree  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SPEC = Path(__file__).resolve().parents[2] / "nydusfs" / "api" / "openapi.yaml"
BASE_URL = "http://nydusd"
MOUNTPOINT = "/img"
EXIT = "/api/v1/daemon/exit"

schema = schemathesis.openapi.from_path(SPEC)


# --- the document ------------------------------------------------------------------------------


def test_document_is_valid_openapi() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    doc = yaml.safe_load(SPEC.read_text())
    validator.validate(doc)
    assert doc["openapi"] == "3.0.3"


def test_document_covers_every_route() -> None:
    doc = yaml.safe_load(SPEC.read_text())
    routes = ApiRoutes(Daemon("/unused", handle_signals=False)).routes
    implemented = {(path, method.lower()) for path, methods in routes.items() for method in methods}
    documented = {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    }
    assert documented == implemented


def test_document_is_package_data() -> None:
    from importlib.resources import files

    assert files("nydusfs.api").joinpath("openapi.yaml").read_text() == SPEC.read_text()


# --- the live server ---------------------------------------------------------------------------


@contextlib.contextmanager
def serve_api(tmp: Path) -> Iterator[tuple[Path, Daemon]]:
    """A daemon's API on ``tmp/api.sock`` in a thread, with an image mounted at /img."""
    images = tmp / "images"
    src = write_tree(tmp / "src", {"hello": b"hello\n", "dir/data": bytes(range(256)) * 64})
    boot = make_image(src, images)
    config = load_config(mount_config(images, tmp / "cache"), strict=True)
    sock = tmp / "api.sock"
    daemon = Daemon(str(tmp / "mnt"), handle_signals=False, id="openapi-test")
    ready = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    cancel: list[trio.CancelScope] = []
    failure: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cancel.append(nursery.cancel_scope)
            token.append(trio.lowlevel.current_trio_token())
            daemon.service.attach(nursery)
            await daemon.service.mount(MountCmd("rafs", str(boot), config, MOUNTPOINT, []))
            daemon.state = DaemonState.RUNNING
            server = ApiServer(str(sock), ApiRoutes(daemon))
            await nursery.start(server.serve)
            ready.set()
        with trio.CancelScope(shield=True):
            await daemon.service.umount_all()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:
            failure.append(e)
        finally:
            ready.set()

    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    thread = threading.Thread(target=run, name="api-server", daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the API server did not start"
        if failure:
            raise failure[0]
        yield sock, daemon
    finally:
        if token:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(cancel[0].cancel, trio_token=token[0])
        thread.join(30)
        reset_registry_auth()  # PUT /api/v1/config changes process-wide credentials
        for name, level in levels.items():  # PUT /api/v1/daemon changes log levels
            logging.getLogger(name).setLevel(level)
    if failure:
        raise failure[0]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Daemon]]:
    with serve_api(tmp_path_factory.mktemp("openapi")) as served:
        yield served


@pytest.fixture(scope="module")
def session(api: tuple[Path, Daemon]) -> Iterator[requests.Session]:
    s = requests.Session()
    s.mount("http://", UnixSocketAdapter(str(api[0])))
    yield s
    s.close()


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except a 501 the operation documents (a feature this build does not have)."""
    status = int(response.status_code)
    documented = case.operation.definition.raw.get("responses", {})
    if status >= 500 and not (status == 501 and "501" in documented):
        raise AssertionError(f"server error {status}: {response.text}")
    return None


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@schema.exclude(path=EXIT).parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms(case: Any, session: requests.Session) -> None:
    response = case.call(base_url=BASE_URL, session=session, timeout=10)
    case.validate_response(
        response, checks=CHECKS, excluded_checks=[not_a_server_error], headers=case.headers
    )


def call(
    session: requests.Session, path: str, method: str, *, stopping: bool = False, **kw: Any
) -> requests.Response:
    """One request, validated; ``stopping``: a 503 NotReady is the expected answer."""
    case = schema[path][method].Case(**kw)
    response = case.call(base_url=BASE_URL, session=session, timeout=10)
    checks = CHECKS[1:] if stopping else CHECKS
    case.validate_response(response, checks=checks, excluded_checks=[not_a_server_error])
    return response


def test_success_bodies_conform(api: tuple[Path, Daemon], session: requests.Session) -> None:
    """The 200 replies fuzzing rarely reaches (a mounted image's id) match their schemas."""
    q = {"id": MOUNTPOINT}
    assert call(session, "/api/v1/daemon", "GET").json()["backend_collection"]
    assert call(session, "/api/v2/daemon", "GET").json()["state"] == "RUNNING"
    meta = call(session, "/api/v1/daemon/backend", "GET", query={"mountpoint": "//img/"}).json()
    assert meta["mountpoint"] == MOUNTPOINT
    for path in ("", "/files", "/pattern", "/backend", "/blobcache"):
        assert call(session, f"/api/v1/metrics{path}", "GET", query=q).status_code == 200
    call(session, "/api/v1/metrics/files", "GET", query={**q, "latest": "true"})
    assert call(session, "/api/v1/metrics/inflight", "GET").status_code in (200, 204)
    assert "nydusd" in call(session, "/api/v1/metrics/prometheus", "GET").text
    auth = {"registry_auth": "dXNlcjpwYXNz"}  # user:pass
    assert call(session, "/api/v1/config", "PUT", body=auth, query=q).status_code == 204
    assert call(session, "/api/v1/config", "GET", query=q).json() == auth
    assert call(session, "/api/v1/daemon", "PUT", body={"log_level": " Info "}).status_code == 204


def test_exit_last(api: tuple[Path, Daemon], session: requests.Session) -> None:
    """Exit answers 204 and the daemon is then STOPPED: mount changes are 503."""
    assert call(session, EXIT, "PUT").status_code == 204
    assert api[1].state is DaemonState.STOPPED
    assert call(session, "/api/v2/daemon", "GET").json()["state"] == "STOPPED"
    r = call(session, "/api/v1/mount", "DELETE", stopping=True, query={"mountpoint": MOUNTPOINT})
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "NotReady"
