"""``FsMachine``: a hypothesis state machine that applies random operations to several targets.

Subclasses set ``self.targets`` (name -> target with the ``tests.helpers.fsmodel`` operations; the
first is the reference, usually the ``Model``) in ``__init__``. Every step runs on every target;
the answers (values or errnos) must agree, and after every step so must the whole visible tree.
Paths are drawn from a small alphabet, so operations collide often: the interesting cases
(replacing, removing what a lower layer has, renaming over things) come up in short runs.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nydusfs.passthrough import sys as psys
from tests.helpers.fsmodel import MDir, Model, Result, outcome

NAMES = "abcd"
PATHS = ["/".join(parts) for depth in (1, 2, 3) for parts in itertools.product(NAMES, repeat=depth)]
# Each depth is as likely as the others, so parents exist often enough for deeper steps.
paths = st.one_of(*(st.sampled_from([p for p in PATHS if p.count("/") == d]) for d in (0, 1, 2)))
datas = st.binary(min_size=0, max_size=48)


class FsMachine(RuleBasedStateMachine):
    targets: dict[str, Any]
    exchange_dirs = True  # may RENAME_EXCHANGE swap directories (not on the kernel overlay)

    def _apply(self, op: str, *args: Any) -> Result:
        results = {name: outcome(lambda t=t: getattr(t, op)(*args))
                   for name, t in self.targets.items()}  # fmt: skip
        first_name, first = next(iter(results.items()))
        for name, result in results.items():
            assert result == first, f"{op}{args}: {first_name} gave {first}, {name} gave {result}"
        return first

    def model(self) -> Model:
        model = next(iter(self.targets.values()))
        assert isinstance(model, Model)
        return model

    @rule(path=paths, data=datas)
    def create(self, path: str, data: bytes) -> None:
        self._apply("create", path, data)

    @rule(path=paths, offset=st.integers(0, 96), data=datas)
    def write(self, path: str, offset: int, data: bytes) -> None:
        self._apply("write", path, offset, data)

    @rule(path=paths, data=datas)
    def append(self, path: str, data: bytes) -> None:
        self._apply("append", path, data)

    @rule(path=paths, size=st.integers(0, 80))
    def truncate(self, path: str, size: int) -> None:
        self._apply("truncate", path, size)

    @rule(path=paths)
    def read(self, path: str) -> None:
        self._apply("read", path)

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self._apply("mkdir", path)

    @rule(path=paths)
    def symlink(self, path: str) -> None:
        self._apply("symlink", path)

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self._apply("link", src, dst)

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self._apply("unlink", path)

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self._apply("rmdir", path)

    @rule(
        src=paths,
        dst=paths,
        flags=st.sampled_from([0, 0, psys.RENAME_NOREPLACE, psys.RENAME_EXCHANGE]),
    )
    def rename(self, src: str, dst: str, flags: int) -> None:
        assume(not (src + "/").startswith(dst + "/") and not (dst + "/").startswith(src + "/"))
        if flags & psys.RENAME_EXCHANGE and not self.exchange_dirs:
            model = self.model()
            for path in (src, dst):
                with contextlib.suppress(OSError):
                    assume(not isinstance(model.get(path, follow=False), MDir))
        self._apply("rename", src, dst, flags)

    @rule(path=paths, mode=st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o444]))
    def chmod(self, path: str, mode: int) -> None:
        self._apply("chmod", path, mode)

    @rule(path=paths, value=st.binary(min_size=1, max_size=16))
    def setxattr(self, path: str, value: bytes) -> None:
        self._apply("setxattr", path, value)

    @rule(path=st.sampled_from(["", *PATHS[:20]]))
    def listdir(self, path: str) -> None:
        self._apply("listdir", path)

    @invariant()
    def same_tree(self) -> None:
        snaps = {name: t.snapshot() for name, t in self.targets.items()}
        first_name, first = next(iter(snaps.items()))
        for name, snap in snaps.items():
            if snap != first:
                diff = sorted(
                    (k, first.get(k), snap.get(k))
                    for k in set(first) | set(snap)
                    if first.get(k) != snap.get(k)
                )
                raise AssertionError(f"{name} differs from {first_name}: {diff}")
