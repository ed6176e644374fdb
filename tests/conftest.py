"""Suite-wide pytest setup: root-only tests, no skips in CI, cached generated source trees."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.tree import TreeFactory, make_tree


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked ``root`` need kernel mounts; as non-root they skip instead of failing.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (kernel mounts)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def _fail_skips_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    # Outside CI a missing tool (nginx, docker-registry, moto...) skips its tests; in CI
    # `make deps` installs everything, so a skip there is a broken install and must fail.
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.fixture(scope="session")
def tree_factory(tmp_path_factory: pytest.TempPathFactory) -> TreeFactory:
    """``tree_factory(files=..., total_bytes=..., seed=..., **make_tree_kwargs) -> Path``: a tree
    made once per session for each distinct set of arguments. Shared: do not modify it."""
    cache: dict[tuple[tuple[str, Any], ...], Path] = {}

    def factory(**kwargs: Any) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp("tree") / "src"
            make_tree(root, **kwargs)
            cache[key] = root
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def small_tree(tree_factory: TreeFactory) -> Path:
    """A tree with every special case and ~120 files / 3 MiB (255-byte names included)."""
    return tree_factory(files=120, total_bytes=3 << 20, seed=1)
