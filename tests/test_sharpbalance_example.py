"""examples/sharpbalance_ensemble.py runs end to end on a tiny budget."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sharpbalance_ensemble.py"


@pytest.mark.slow
def test_example_quick_budget_prints_the_table():
    # A subprocess: the example sets torch's thread count and global seeds.
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True, timeout=300,
        check=True,
    ).stdout
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    header = [c.strip() for c in rows["method"].split("|")]
    assert header[1:5] == ["ens acc", "ens nll", "ens cnll", "ens ece"] and "der" in header
    for method in ("deep", "sam", "sharpbalance", "sharpbalance_low"):
        values = [float(c) for c in rows[method].split("|")[1:]]
        assert len(values) == len(header) - 1
        assert all(math.isfinite(v) for v in values)
        assert 0.0 <= values[0] <= 1.0  # accuracy
        assert values[1] > 0  # NLL
