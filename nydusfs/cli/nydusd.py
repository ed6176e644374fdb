"""``nydusd`` entry point: a placeholder until the real implementation lands."""

from __future__ import annotations

import sys


def main() -> None:
    """Say that this command is not available yet and exit with status 2."""
    print("nydusd: not implemented yet in this build", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
