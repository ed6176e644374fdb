"""Where the shared test fixtures live: /work/shared/fixtures next to the /work/main checkout."""

from pathlib import Path

# tests/fixtures_path.py -> parents[0] = tests, [1] = the checkout, [2] = its parent (/work).
UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream"
