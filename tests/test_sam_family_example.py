"""examples/sam_family.py runs end to end on a tiny budget and prints a row
per optimizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sam_family.py"


def test_sam_family_tiny_prints_every_optimizer(tmp_path):
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True, env=env,
    ).stdout
    for name in ("SGD", "SAM", "GSAM", "LookSAM", "WSAM", "FriendlySAM", "BayesianSAM", "ESAM", "MESA"):
        assert f"| {name} |" in out
    assert (tmp_path / "sam_family.md").read_text().count("\n| ") == 10  # header + 9 rows
