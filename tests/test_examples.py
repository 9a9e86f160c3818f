"""Every example runs end to end with a tiny budget, so none of them rots."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: example -> arguments that make it finish in seconds
TINY = {
    "quickstart.py": ["--tiny"],
    "sharpness_vs_generalization.py": ["--tiny"],
    "optimizers_minimum_sharpness.py": ["--tiny"],
    "sam_results_table.py": ["--tiny"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *TINY[name]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "an example prints its results"


#: examples with a dedicated test file that checks more of their output
TESTED_ELSEWHERE = {
    "sam_digits.py": "test_sam_example.py",
    "sharpbalance_ensemble.py": "test_sharpbalance_example.py",
    "nonuniformity.py": "test_nonuniformity_example.py",
    "landscape.py": "test_landscape.py",
    "sam_family.py": "test_sam_family_example.py",
    "sam_hf_loop.py": "test_sam_integrations.py",
    "sam_lightning.py": "test_sam_integrations.py",
}


def test_every_example_is_exercised():
    here = Path(__file__).parent
    for test_file in TESTED_ELSEWHERE.values():
        assert (here / test_file).exists(), test_file
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted({*TINY, *TESTED_ELSEWHERE})
