"""API tests that mount run on both FUSE transports (``tests.helpers.transports``)."""

from tests.helpers.transports import fuse_transport, pytest_generate_tests

__all__ = ["fuse_transport", "pytest_generate_tests"]
