"""SharpBalance pieces: data splits and per-sample sharpness scores."""

from __future__ import annotations

import copy

import cases
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from flatness import diversity as dv

# --------------------------------------------------------------------------
# sharpbalance_split on hand-made scores
# --------------------------------------------------------------------------


def as_list(t):
    return t.tolist()


def test_split_hand_made_three_members():
    # N = 10, flat_ratio = 0.2 -> k = 2 samples in each member's top set.
    scores = torch.tensor(
        [
            [9, 8, 0, 0, 0, 0, 0, 0, 0, 1],  # top0 = {0, 1}
            [0, 0, 0, 0, 0, 0, 0, 0, 7, 6],  # top1 = {8, 9}
            [0, 9, 8, 0, 0, 0, 0, 0, 0, 0],  # top2 = {1, 2}
        ],
        dtype=torch.float64,
    )
    # In some top set: {0, 1, 2, 8, 9}; in none: [3, 4, 5, 6, 7].
    # Round robin over 3 members: member 0 -> [3, 6], 1 -> [4, 7], 2 -> [5].
    expected_sam = {
        0: sorted({8, 9} | {1, 2} | {3, 6}),
        1: sorted({0, 1} | {1, 2} | {4, 7}),
        2: sorted({0, 1} | {8, 9} | {5}),
    }
    for member, sam in expected_sam.items():
        got_sam, got_plain = dv.sharpbalance_split(scores, member, 0.2)
        assert as_list(got_sam) == sam
        assert as_list(got_plain) == sorted(set(range(10)) - set(sam))


def test_split_lowest_scores_first_and_ties():
    # largest=False ranks the lowest scores first (the authors' main.py).
    # Ties: the lower sample index wins.
    scores = [
        np.array([1.0, 1.0, 1.0, 5.0, 5.0, 5.0]),  # bottom-2 = {0, 1} (tie among 0,1,2)
        np.array([5.0, 5.0, 5.0, 5.0, 0.0, 0.0]),  # bottom-2 = {4, 5}
    ]
    # union of tops = {0, 1, 4, 5}; in none: [2, 3] -> member 0 gets [2], member 1 gets [3]
    sam0, plain0 = dv.sharpbalance_split(scores, 0, 1 / 3, largest=False)
    sam1, plain1 = dv.sharpbalance_split(scores, 1, 1 / 3, largest=False)
    assert as_list(sam0) == [2, 4, 5] and as_list(plain0) == [0, 1, 3]
    assert as_list(sam1) == [0, 1, 3] and as_list(plain1) == [2, 4, 5]
    # highest first: top0 = {3, 4} (tie 3,4,5), top1 = {0, 1} (tie 0..3); none: [2, 5]
    sam0, _ = dv.sharpbalance_split(scores, 0, 1 / 3)
    assert as_list(sam0) == [0, 1, 2]


def test_split_others_share_hand_made():
    # The same scores as test_split_hand_made_three_members; leftover="others"
    # (the authors' CIFAR-10 split): SAM on the other members' top sets and
    # the other members' round-robin shares of [3, 4, 5, 6, 7]
    # (shares: 0 -> [3, 6], 1 -> [4, 7], 2 -> [5]).
    scores = torch.tensor(
        [
            [9, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 7, 6],
            [0, 9, 8, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float64,
    )
    expected_sam = {
        0: sorted({8, 9} | {1, 2} | {4, 7} | {5}),
        1: sorted({0, 1} | {1, 2} | {3, 6} | {5}),
        2: sorted({0, 1} | {8, 9} | {3, 6} | {4, 7}),
    }
    for member, sam in expected_sam.items():
        got_sam, got_plain = dv.sharpbalance_split(scores, member, 0.2, leftover="others")
        assert as_list(got_sam) == sam
        assert as_list(got_plain) == sorted(set(range(10)) - set(sam))
    # one member: no other top sets and no other shares -> no SAM at all
    got_sam, got_plain = dv.sharpbalance_split(scores[:1], 0, 0.2, leftover="others")
    assert as_list(got_sam) == [] and as_list(got_plain) == list(range(10))
    with pytest.raises(ValueError, match="leftover"):
        dv.sharpbalance_split(scores, 0, 0.2, leftover="mine")


def _authors_split(flats, i, flat_ratio, boost, ascend):
    """``boosting_sam_split`` / ``boosting_sam_split_boost`` of the
    SharpBalance authors' ``engine.py`` (github.com/haiquanlu/SharpBalance,
    MIT licence), reimplemented: returns their ``normal_indice`` (the samples
    with plain steps)."""
    n = flats[0].shape[0]
    normal = np.arange(n)
    total = int(n * flat_ratio)

    def top(j):
        order = np.argsort(flats[j])
        return order[:total] if ascend else order[-total:]

    sam = np.array([])
    for j in flats:
        if j != i:
            sam = np.union1d(sam, top(j))
    sharp = np.array([])
    for j in flats:
        sharp = np.union1d(sharp, top(j))
    flat = list(set(normal) - set(sharp))
    split = flat[i::len(flats)]
    extra = list(set(flat) - set(split)) if boost else split
    sharp = np.union1d(sam, extra)
    return sorted(int(v) for v in set(normal) - set(sharp))


@pytest.mark.parametrize("leftover", ["own", "others"])
@pytest.mark.parametrize("largest", [False, True])
def test_split_equals_authors_code(leftover, largest):
    # distinct scores (the authors' argsort breaks ties arbitrarily)
    gen = torch.Generator().manual_seed(3)
    for m, n, ratio in ((2, 30, 0.3), (3, 50, 0.2), (4, 41, 0.1), (5, 20, 0.5)):
        scores = torch.rand(m, n, generator=gen, dtype=torch.float64)
        flats = {j: scores[j].numpy() for j in range(m)}
        for i in range(m):
            # the authors' ascend=True (main.py) is largest=False
            plain = _authors_split(flats, i, ratio, boost=leftover == "others", ascend=not largest)
            got_sam, got_plain = dv.sharpbalance_split(scores, i, ratio, largest=largest, leftover=leftover)
            assert as_list(got_plain) == plain
            assert as_list(got_sam) == sorted(set(range(n)) - set(plain))


def test_split_edge_ratios():
    scores = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    # flat_ratio = 0: no top sets; SAM only on the round-robin share
    assert as_list(dv.sharpbalance_split(scores, 1, 0.0)[0]) == [1]
    # flat_ratio = 1: every sample is in every top set: SAM on everything
    assert as_list(dv.sharpbalance_split(scores, 1, 1.0)[0]) == [0, 1, 2, 3]
    # 0.29 * 100 is 28.999999999999996 in floating point; still 29 samples
    wide = torch.arange(100, dtype=torch.float64)[None]
    assert len(dv.random_split(100, 0, 0.29)[0]) == 29
    assert len(dv.sharpbalance_split(torch.cat([wide, -wide]), 0, 0.29)[0]) == 29 + (100 - 58 + 1) // 2


def test_split_bad_input():
    scores = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"member must be in \[0, 3\)"):
        dv.sharpbalance_split(scores, 3, 0.5)
    with pytest.raises(ValueError, match=r"flat_ratio must be in \[0, 1\]"):
        dv.sharpbalance_split(scores, 0, 1.5)
    with pytest.raises(ValueError, match="same length"):
        dv.sharpbalance_split([torch.zeros(4), torch.zeros(5)], 0, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        dv.sharpbalance_split(torch.full((2, 3), float("nan")), 0, 0.5)
    with pytest.raises(TypeError, match="scores must be"):
        dv.sharpbalance_split("abc", 0, 0.5)


# --------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------


@st.composite
def score_matrices(draw):
    m = draw(st.integers(1, 5))
    n = draw(st.integers(1, 40))
    # few distinct values: many ties
    vals = draw(st.lists(st.integers(0, 4), min_size=m * n, max_size=m * n))
    return torch.tensor(vals, dtype=torch.float64).reshape(m, n)


@given(score_matrices(), st.floats(0.0, 1.0), st.booleans())
def test_split_properties(scores, ratio, largest):
    m, n = scores.shape
    k = int(np.floor(ratio * n + 1e-9))
    # an independent top-k: numpy's stable argsort on (negated) scores
    tops = []
    for row in scores.numpy():
        order = np.argsort(-row if largest else row, kind="stable")
        tops.append(set(order[:k].tolist()))
    in_any = set().union(*tops)
    neither = sorted(set(range(n)) - in_any)
    shares = []
    for i in range(m):
        sam, plain = dv.sharpbalance_split(scores, i, ratio, largest=largest)
        sam_s, plain_s = set(sam.tolist()), set(plain.tolist())
        assert sam.dtype == torch.int64 and plain.dtype == torch.int64
        assert sam_s.isdisjoint(plain_s) and sam_s | plain_s == set(range(n))  # disjoint, covering
        assert sam.tolist() == sorted(sam_s) and plain.tolist() == sorted(plain_s)
        others = set().union(*(tops[j] for j in range(m) if j != i))
        share = sam_s - others
        assert share <= set(neither)  # the extra SAM samples are in no top set
        assert len(sam) == len(others) + len(share)  # sizes
        assert len(share) == len(neither[i::m])
        shares.append(share)
        # leftover="others": the same top sets, and the leftover samples the own share lacks
        sam_o, plain_o = dv.sharpbalance_split(scores, i, ratio, largest=largest, leftover="others")
        assert set(sam_o.tolist()) == others | (set(neither) - share)
        assert set(sam_o.tolist()).isdisjoint(plain_o.tolist()) and len(sam_o) + len(plain_o) == n
    # the shares partition the samples in no top set, as evenly as possible
    assert set().union(*shares) == set(neither)
    assert sum(len(s) for s in shares) == len(neither)
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


@given(st.integers(1, 60), st.integers(0, 4), st.floats(0.0, 1.0), st.integers(0, 10**6))
def test_random_split_properties(n, member, ratio, seed):
    sam, plain = dv.random_split(n, member, ratio, seed=seed)
    assert len(sam) == int(np.floor(ratio * n + 1e-9))
    assert set(sam.tolist()).isdisjoint(plain.tolist())
    assert sorted(sam.tolist() + plain.tolist()) == list(range(n))
    # same=True ignores the member; the result is a function of the seed
    a, _ = dv.random_split(n, member, ratio, seed=seed, same=True)
    b, _ = dv.random_split(n, member + 1, ratio, seed=seed, same=True)
    assert torch.equal(a, b)


def test_random_split_members_differ_and_global_rng_untouched():
    state = torch.get_rng_state()
    a, _ = dv.random_split(100, 0, 0.5, seed=1)
    b, _ = dv.random_split(100, 1, 0.5, seed=1)
    assert not torch.equal(a, b)
    assert torch.equal(a, dv.random_split(100, 0, 0.5, seed=1)[0])
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------
# per-sample sharpness
# --------------------------------------------------------------------------


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.3), nn.Linear(7, 3)).double()


def cnn_bn():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    ).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def data_for(model, n=11, seed=2):
    if isinstance(model[0], nn.Conv2d):
        return cases.classification_batch(n, (2, 5, 5), 4, seed)
    return cases.classification_batch(n, (5,), 3, seed)


def loop_fisher(model, x, y):
    """Reference: one autograd.grad call per sample, in eval mode."""
    model = copy.deepcopy(model).eval()
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        g = torch.autograd.grad(loss, list(model.parameters()))
        out.append(sum(float(t.pow(2).sum()) for t in g))
    return torch.tensor(out, dtype=torch.float64)


def snapshot(model):
    return (
        model.training,
        [(p.data_ptr(), p.detach().clone(), p.requires_grad, p.grad) for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
    )


def assert_unchanged(model, snap):
    training, params, buffers = snap
    assert model.training == training
    for p, (ptr, val, req, g) in zip(model.parameters(), params, strict=True):
        assert p.data_ptr() == ptr and torch.equal(p, val) and p.requires_grad == req and p.grad is g
    for b, val in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, val)


@pytest.mark.parametrize("make", [mlp, cnn_bn], ids=["mlp-dropout", "cnn-batchnorm"])
def test_fisher_matches_single_sample_loop(make):
    model = make().train()
    x, y = data_for(model)
    snap = snapshot(model)
    rng = torch.get_rng_state()
    # uneven batches and a chunk size that splits them
    loader = [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:], y[5:])]
    got = dv.per_sample_sharpness(model, loader, "fisher", chunk_size=3)
    ref = loop_fisher(model, x, y)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)  # in fact far tighter
    one_batch = dv.per_sample_sharpness(model, (x, y), "fisher", chunk_size=None, trials=2,
                                        progress=True)
    torch.testing.assert_close(one_batch, ref, rtol=1e-10, atol=1e-12)
    assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)


def loop_sam(model, x, y, rho, adaptive):
    """Reference: SAM perturbation written out on a copy of the model."""
    model = copy.deepcopy(model).eval()
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params)
    with torch.no_grad():
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, g)))
            e = [rho * p**2 * gi / norm for p, gi in zip(params, g)]
        else:
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            e = [rho * gi / norm for gi in g]
        clean = F.cross_entropy(model(x), y, reduction="none")
        for p, ei in zip(params, e):
            p.add_(ei)
        pert = F.cross_entropy(model(x), y, reduction="none")
    return pert - clean


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("make", [mlp, cnn_bn], ids=["mlp-dropout", "cnn-batchnorm"])
def test_sam_scores_match_written_out_reference(make, adaptive):
    model = make().train()
    x, y = data_for(model)
    snap = snapshot(model)
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    got = dv.per_sample_sharpness(model, loader, "sam", rho=0.1, adaptive=adaptive, progress=True)
    ref = torch.cat([loop_sam(model, xb, yb, 0.1, adaptive) for xb, yb in loader])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert_unchanged(model, snap)
    # a positive mean: the batch's loss goes up along its own gradient
    assert got[:6].mean() > 0 and got[6:].mean() > 0


def test_per_sample_sharpness_bad_input_and_failure_restores():
    model = mlp().train()
    x, y = data_for(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"kind must be one of \('fisher', 'sam'\)"):
        dv.per_sample_sharpness(model, (x, y), "hessian")
    with pytest.raises(ValueError, match="rho must be > 0"):
        dv.per_sample_sharpness(model, (x, y), "sam", rho=0.0)
    with pytest.raises(ValueError, match="trials"):
        dv.per_sample_sharpness(model, (x, y), trials=0)
    with pytest.raises(ValueError, match="chunk_size"):
        dv.per_sample_sharpness(model, (x, y), chunk_size=0)

    def bad_loader():
        yield x[:4], y[:4]
        raise RuntimeError("disk gone")

    for kind in ("fisher", "sam"):
        with pytest.raises(RuntimeError, match="disk gone"):
            dv.per_sample_sharpness(model, bad_loader(), kind)
        assert_unchanged(model, snap)


def test_fisher_with_selected_params_and_float32():
    model = mlp().float().eval()
    x, y = data_for(model)
    x = x.float()
    got = dv.per_sample_sharpness(model, (x, y), params=[model[3].weight])
    ref = []
    for i in range(x.shape[0]):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [model[3].weight])
        ref.append(float(g.double().pow(2).sum()))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_sam_scores_warn_when_bfloat16_rounds_the_perturbation_away():
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    batch = (torch.randn(32, 256), torch.randint(0, 10, (32,)))
    with pytest.warns(RuntimeWarning, match="bfloat16 lost .* rho=0.005") as record:
        dv.per_sample_sharpness(copy.deepcopy(model).to(torch.bfloat16), batch, kind="sam", rho=0.005)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dv.per_sample_sharpness(model, batch, kind="sam", rho=0.005)
