"""SpectralDensity.plot is readable by default."""

import pytest
import torch

from flatness.hessian import spectral_density


def test_plot_axes_are_readable():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    d = spectral_density(model, batch, n_vectors=2, n_steps=8)
    assert float(d.density.min()) < 1e-12 * float(d.density.max())  # tails: a plain log axis spans decades
    ax = d.plot()
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert ax.get_xlabel() and ax.get_ylabel()
    lo, hi = d.plot(log=True).get_ylim()
    assert ax.figure is not None and 1e5 <= hi / lo <= 1e7  # six decades below the peak, not 300
