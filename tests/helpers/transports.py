"""Tests that mount through ``nydusd`` run once per FUSE transport: pyfuse3 and /dev/fuse.

A ``conftest.py`` imports ``pytest_generate_tests`` and ``fuse_transport`` from here; then the
modules listed in ``BOTH_TRANSPORTS`` get a ``[pyfuse3]`` and a ``[fusedev]`` variant of each
test, and the daemon (a subprocess or in-process) picks the transport from the environment.
"""

from __future__ import annotations

import pytest

from nydusfs.daemon.frontends import FUSE_TRANSPORTS, TRANSPORT_ENV

# test_routes is left out: its module-scoped images share one blob cache, which the first
# transport would warm for the second (it passes under either transport on its own).
BOTH_TRANSPORTS = frozenset({"test_nydusd", "test_service", "test_stress"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in BOTH_TRANSPORTS and "fuse_transport" in metafunc.fixturenames:
        metafunc.parametrize("fuse_transport", FUSE_TRANSPORTS, indirect=True)


@pytest.fixture(autouse=True)
def fuse_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    transport: str = getattr(request, "param", FUSE_TRANSPORTS[0])
    monkeypatch.setenv(TRANSPORT_ENV, transport)
    return transport
