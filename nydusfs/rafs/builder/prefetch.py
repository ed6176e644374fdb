"""Build-time prefetch policy: which files go first in the blob and into the prefetch table.

With ``--prefetch-policy fs`` the builder reads absolute paths (one per line) from stdin. A path
covered by an earlier path (itself or an ancestor) is dropped, as upstream does. Regular files
under a pattern are laid out at the start of the blob, in pattern order; the prefetch table lists
the nodes that match a pattern exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nydusfs.errors import BuildError
from nydusfs.rafs.builder.node import Node

log = logging.getLogger(__name__)

POLICIES = ("none", "fs", "blob")


def _normalize(path: bytes) -> bytes:
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    return b"/" + b"/".join(parts)


class Prefetch:
    """Patterns and the nodes they select, filled in inode order by the bootstrap writer."""

    def __init__(self, policy: str = "none", patterns: Iterable[bytes] = ()) -> None:
        if policy not in POLICIES:
            raise BuildError(f"invalid prefetch policy {policy!r} (expected fs, blob or none)")
        self.policy = policy
        self.patterns: dict[bytes, Node | None] = {}
        if policy != "none":
            for raw in patterns:
                line = raw.strip()
                if not line:
                    continue
                if not line.startswith(b"/"):
                    log.warning("prefetch path %r is not absolute, ignored", line)
                    continue
                path = _normalize(line)
                if self._covered(path):
                    log.warning("prefetch path %r is covered by an earlier one, ignored", line)
                    continue
                self.patterns[path] = None
        self._order = {p: i for i, p in enumerate(self.patterns)}
        self._prefetch: list[tuple[int, int, Node]] = []
        self._rest: list[Node] = []

    def _covered(self, path: bytes) -> bool:
        probe = path
        while True:
            if probe in self.patterns:
                return True
            if probe == b"/":
                return False
            probe = probe.rsplit(b"/", 1)[0] or b"/"

    def insert(self, node: Node) -> None:
        if self.policy == "none" or (node.is_reg() and node.size == 0):
            self._rest.append(node)
            return
        probe = node.path
        exact = True
        while True:
            index = self._order.get(probe)
            if index is not None:
                if exact:
                    self.patterns[probe] = node
                if node.is_reg():
                    self._prefetch.append((index, len(self._prefetch), node))
                else:
                    self._rest.append(node)
                return
            if probe == b"/":
                self._rest.append(node)
                return
            probe = probe.rsplit(b"/", 1)[0] or b"/"
            exact = False

    def data_order(self) -> tuple[list[Node], int]:
        """Nodes in the order their data goes into the blob, and how many are prefetched."""
        first = [n for _, _, n in sorted(self._prefetch, key=lambda t: (t[0], t[1]))]
        return first + self._rest, len(first)

    def table_nodes(self) -> list[Node]:
        """Nodes for the bootstrap prefetch table (``fs`` policy only), in pattern order."""
        if self.policy != "fs":
            return []
        return [n for n in self.patterns.values() if n is not None]
