"""examples/nonuniformity.py runs end to end with its small budget."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nonuniformity.py"


def test_nonuniformity_example_tiny(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tiny"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("SGD", "SAM", "ConsistentSAM", "NonuniformSAM"):
        assert name in proc.stdout
    assert "Kendall tau" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "nonuniformity.png").stat().st_size > 0
