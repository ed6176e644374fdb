"""Fixtures for the cache tests: one image built once per session."""

from __future__ import annotations

import pytest

from tests.cache.util import Image, build_image


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build_image(tmp_path_factory.mktemp("cache-image"))
