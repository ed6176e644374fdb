"""Mount tests run once per FUSE transport: pyfuse3 and the project's own /dev/fuse codec.

Modules listed in ``BOTH_TRANSPORTS`` get a ``[pyfuse3]`` and a ``[fusedev]`` variant of each
test; the daemon (a subprocess or in-process) picks the transport from the environment.
"""

from __future__ import annotations

import pytest

from nydusfs.daemon.frontends import FUSE_TRANSPORTS, TRANSPORT_ENV

BOTH_TRANSPORTS = frozenset({"test_nydusd", "test_service"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in BOTH_TRANSPORTS and "fuse_transport" in metafunc.fixturenames:
        metafunc.parametrize("fuse_transport", FUSE_TRANSPORTS, indirect=True)


@pytest.fixture(autouse=True)
def fuse_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    transport: str = getattr(request, "param", FUSE_TRANSPORTS[0])
    monkeypatch.setenv(TRANSPORT_ENV, transport)
    return transport
