"""CurvatureOperator's collaborators are constructor arguments: the progress
bar (anything with ``update(k)``) and the reduction over ranks."""

import pytest
import torch
from torch import nn

from flatness._checks import ProductBar
from flatness._hvp import CurvatureOperator


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))) for _ in range(2)]
    return model, batches


class _Counter:
    def __init__(self):
        self.calls = []

    def update(self, k):
        self.calls.append(k)


def test_progress_is_told_every_product():
    model, batches = _setup()
    counter = _Counter()
    op = CurvatureOperator(model, batches, progress=counter)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    op.matmat(V)
    op.matvec(V[:, 0])
    assert counter.calls == [3, 1] and op.n_hvp == 4


def test_reduce_receives_the_sums_and_the_count():
    model, batches = _setup()
    V = torch.randn(CurvatureOperator(model, batches).shape[0], 2, dtype=torch.float64)
    ref = CurvatureOperator(model, batches).matmat(V)
    assert torch.equal(CurvatureOperator(model, batches, reduce=None).matmat(V), ref)
    seen = []

    def two_identical_ranks(*values):
        # what an all-reduce over two ranks holding the same batches returns
        seen.append(values[-1])
        for t in values[:-1]:
            t.mul_(2)
        return (*values[:-1], 2 * values[-1])

    got = CurvatureOperator(model, batches, reduce=two_identical_ranks).matmat(V)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert seen == [10]  # the size-weighted sum over both batches is reduced, not the mean
    # one batch: the product itself is not written in place by the reduction
    one = batches[0]
    ref1 = CurvatureOperator(model, one).matmat(V)
    torch.testing.assert_close(CurvatureOperator(model, one, reduce=two_identical_ranks).matmat(V), ref1,
                               rtol=1e-12, atol=1e-12)


def test_bad_collaborators_are_refused():
    model, batches = _setup()
    with pytest.raises(TypeError, match="progress"):
        CurvatureOperator(model, batches, progress=3)
    with pytest.raises(TypeError, match="reduce"):
        CurvatureOperator(model, batches, reduce="sum")


def test_product_bar_opens_at_the_first_product():
    pytest.importorskip("tqdm")
    bar = ProductBar("hvp")
    assert bar._bar is None
    bar.total = 4
    bar.update(2)
    assert bar._bar.total == 4 and bar._bar.n == 2
    bar.close()


def test_finiteness_check_without_temporaries_matches_isfinite():
    # require_finite reads the extremes (NaN propagates through them), row by
    # row for strided views; it must agree with torch.isfinite everywhere
    from flatness._checks import _all_finite

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        base = torch.randn(4, 5, 6, generator=g).to(dtype)
        for bad in (None, float("nan"), float("inf"), float("-inf")):
            x = base.clone()
            if bad is not None:
                x[2, 3, 1] = bad
            for view in (x, x.transpose(0, 2), x[:, 1:4], x[1], x[2, 3, 1]):
                assert _all_finite(view) == bool(torch.isfinite(view).all()), (dtype, bad, view.shape)
    assert _all_finite(torch.empty(0)) and _all_finite(torch.tensor([1, 2]))
