"""CurvatureOperator's collaborators are constructor arguments: the progress
bar (anything with ``update(k)``) and the reduction over ranks."""

import pytest
import torch
from cases import peak_allocated
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
            for view in (x, x.transpose(0, 2), x[:, 1:4], x[1], x[2, 3, 1], x[:, ::2], x.permute(2, 0, 1),
                         x.unsqueeze(0).to(memory_format=torch.channels_last)):
                assert _all_finite([view]) == bool(torch.isfinite(view).all()), (dtype, bad, view.shape)
                # several tensors: finite when all are
                assert _all_finite([base, view, base[0]]) == bool(torch.isfinite(view).all())
    assert _all_finite([torch.empty(0)]) and _all_finite([torch.tensor([1, 2])]) and _all_finite([])
    c = torch.ones(3, dtype=torch.complex64)
    assert _all_finite([c]) and not _all_finite([c.index_fill(0, torch.tensor([1]), complex(0, float("nan")))])
    # float64 beyond float32's range is finite
    assert _all_finite([torch.tensor([1e300], dtype=torch.float64)])


def test_finiteness_check_reads_a_channels_last_tensor_in_place():
    # a channels-last gradient is dense in another order of its dimensions:
    # one reduction over it, no copy and no reduction per row
    from flatness._checks import _all_finite

    x = torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last)
    calls = []
    real = torch.aminmax

    def counting(t, *a, **k):
        calls.append(t.shape)
        return real(t, *a, **k)

    torch.aminmax = counting
    try:
        assert _all_finite([x])
    finally:
        torch.aminmax = real
    assert calls == [x.shape]
    assert peak_allocated(lambda: _all_finite([x])) < 1024


class _TinyLM(nn.Module):
    """Embedding, one attention layer, a GELU MLP and an output head tied to
    the embedding: the shape of the language models the memory work targets."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx)
        mask = torch.triu(torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool), 1)
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        x = x + self.out(nn.functional.gelu(self.fc(self.ln(x))))
        return self.head(x).reshape(-1, self.head.out_features)


def _lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits, targets.reshape(-1))


@pytest.mark.parametrize("engine", ["double-backward", "forward-over-reverse"])
@pytest.mark.parametrize("n_batches", [1, 2])
def test_quadratic_forms_match_the_dense_hessian(engine, n_batches):
    # v^T H v without a product vector (the double-backward engine dots each
    # parameter's product as the backward pass forms it) against the dense
    # float64 Hessian, on an MLP and on a tiny language model with a tied head
    from cases import dense_hessian

    from flatness._products import curvature_kernels

    torch.manual_seed(0)
    model, batches = _setup()
    lm = _TinyLM().double()
    tokens = torch.randint(0, 7, (2 * n_batches, 6), generator=torch.Generator().manual_seed(1))
    lm_batches = [(tokens[2 * i : 2 * i + 2, :-1], tokens[2 * i : 2 * i + 2, 1:]) for i in range(n_batches)]
    for m, data, loss in ((model, batches[:n_batches], nn.functional.cross_entropy), (lm, lm_batches, _lm_loss)):
        with curvature_kernels():  # math attention: the fused kernel has no double backward
            H = dense_hessian(m, data, loss_fn=loss)
        op = CurvatureOperator(m, data if n_batches > 1 else data[0], loss_fn=loss, engine=engine)
        V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        forms = op.quadratic_forms(V)
        assert forms.dtype == torch.float64 and forms.shape == (3,)
        torch.testing.assert_close(forms, ((H @ V) * V).sum(0), rtol=1e-10, atol=1e-12)
        assert op.n_hvp == 3
        # one vector: through the kept graph (one batch) or re-streamed
        # batches; forward-over-reverse runs jvp of grad here too (grad of
        # jvp is wrong through the LayerNorm in torch 2.13: 7 % off)
        torch.testing.assert_close(op.quadratic_forms(V[:, :1]), forms[:1], rtol=1e-12, atol=1e-14)


def test_quadratic_forms_of_the_ggn_and_the_reduction():
    from cases import dense_ggn

    model, batches = _setup()
    G = dense_ggn(model, batches[0])
    V = torch.randn(dense_ggn(model, batches[0]).shape[0], 2, dtype=torch.float64)
    for engine in ("double-backward", "forward-over-reverse"):
        op = CurvatureOperator(model, batches[0], curvature="ggn", engine=engine)
        torch.testing.assert_close(op.quadratic_forms(V), ((G @ V) * V).sum(0), rtol=1e-10, atol=1e-12)

    def two_identical_ranks(*values):
        for t in values[:-1]:
            t.mul_(2)
        return (*values[:-1], 2 * values[-1])

    ref = CurvatureOperator(model, batches).quadratic_forms(V)
    got = CurvatureOperator(model, batches, reduce=two_identical_ranks).quadratic_forms(V)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_products_flush_subnormals_and_restore_the_setting():
    from flatness._products import _flushing_denormals, flushed_denormals

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    assert not _flushing_denormals()
    with flushed_denormals():
        assert _flushing_denormals()
    assert not _flushing_denormals()
    torch.set_flush_denormal(True)  # a caller's own setting is kept
    try:
        with flushed_denormals():
            assert _flushing_denormals()
        assert _flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    model, batches = _setup()
    op = CurvatureOperator(model, batches)
    op.matmat(torch.randn(op.shape[0], 1, dtype=torch.float64))
    assert not _flushing_denormals()


@pytest.mark.parametrize("engine", ["double-backward", "forward-over-reverse"])
def test_matvec_update_adds_the_product_in_place(engine):
    # out <- H v + beta out: in place through the kept graph (one batch,
    # double backward), formed and added otherwise; the same values either way
    lm = _TinyLM().double()
    tokens = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(1))
    one = (tokens[:2, :-1], tokens[:2, 1:])
    two = [one, (tokens[2:, :-1], tokens[2:, 1:])]
    for data in (one, two):
        op = CurvatureOperator(lm, data, loss_fn=_lm_loss, engine=engine)
        g = torch.Generator().manual_seed(3)
        v, w = (torch.randn(op.shape[0], dtype=torch.float64, generator=g) for _ in range(2))
        want = op.matvec(v) - 0.7 * w
        out = w.clone()
        got = op.matvec_update(v, out, -0.7)
        assert got is out and op.n_hvp == 2
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_quadratic_forms_are_the_dots_of_the_products(dtype):
    # The double-backward engine dotted each parameter's product with its
    # piece of v in the parameters' dtype: each dot rounded to bfloat16
    # (this MLP's forms 0.36% off the float64 dot of its own products).
    # The forms dot a weight's two parts (see _products._LeanGradientGraph)
    # before they are added and rounded to the dtype as the product is, so
    # they agree to a fraction of the dtype's resolution, not exactly.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    batch = (4 * torch.randn(32, 8), torch.randint(0, 3, (32,)))
    op = CurvatureOperator(model, batch, engine="double-backward")
    g = torch.Generator().manual_seed(1)
    V = (torch.randint(0, 2, (op.shape[0], 4), generator=g) * 2 - 1).float()
    want = (V.double() * op.matmat(V).double()).sum(0)
    assert torch.allclose(op.quadratic_forms(V), want, rtol=torch.finfo(dtype).eps / 8, atol=0)


def test_kernel_eps_is_tf32s_for_float32_on_a_gpu_that_may_use_it():
    # (a torch.device object needs no GPU)
    from flatness._checks import TF32_EPS, kernel_eps

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    f32 = float(torch.finfo(torch.float32).eps)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        torch.set_float32_matmul_precision("highest")
        assert kernel_eps(torch.float32, cuda) == TF32_EPS  # cuDNN's default
        assert kernel_eps(torch.float32, cpu) == f32
        assert kernel_eps(torch.float64, cuda) == float(torch.finfo(torch.float64).eps)
        assert kernel_eps(torch.bfloat16, cuda) == float(torch.finfo(torch.bfloat16).eps)
        torch.backends.cudnn.allow_tf32 = False
        assert kernel_eps(torch.float32, cuda) == f32
        torch.set_float32_matmul_precision("high")  # TF32 matrix products
        assert kernel_eps(torch.float32, cuda) == TF32_EPS
        # low-memory Lanczos merges copies at the products' rounding: float16's 10 bits
        from types import SimpleNamespace

        from flatness.hessian import _product_dtype

        assert _product_dtype(SimpleNamespace(dtype=torch.float32, device=cuda)) == torch.float16
        assert _product_dtype(SimpleNamespace(dtype=torch.float32, device=cpu)) == torch.float32
        assert _product_dtype(SimpleNamespace(dtype=torch.float64, device=cuda)) == torch.float64
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])

