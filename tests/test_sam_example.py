"""examples/sam_digits.py runs end to end on a tiny budget and prints both rows."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sam_digits.py"


@pytest.mark.slow
def test_sam_digits_tiny_prints_metrics_for_sgd_and_sam():
    # a subprocess: the example sets torch's thread count
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tiny"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in out.splitlines() if "|" in line}
    header = rows["method"]
    assert header[:4] == ["steps", "test acc", "test NLL", "test cNLL"]
    sgd, sam = ([float(c) for c in rows[name]] for name in ("SGD", "SAM"))
    assert sgd[0] == sam[0] > 0  # same budget of optimizer steps
    for row in (sgd, sam):
        assert all(math.isfinite(v) for v in row)
        assert 0.1 < row[1] <= 1.0  # better than chance after 2 epochs
        assert row[2] > 0 and row[header.index("adapt. linf sharp.")] >= 0
