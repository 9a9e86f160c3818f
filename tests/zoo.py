"""A zoo of small float64 models for the tests (no tests here).

Every case is a :class:`Case`: a builder (a fresh, seeded model), one data
batch and the ``loss_fn`` to use.  Tests import :data:`CASES` and
parametrize over :data:`NAMES` (or use the ``zoo_case`` fixture of
``conftest.py``).  The architectures are the ones people train and that
stress the machinery: BatchNorm, GroupNorm on ``channels_last`` tensors,
skip connections, transformer layers (dropout, the fused fast path),
attention modules used without calling their projections, recurrent
kernels, tied weights, parametrizations, dict outputs, hooks, compiled
modules, frozen and unused parameters, buffers written in ``forward``,
several positional inputs (an encoder-decoder called as ``model(src, tgt)``
on batches ``((src, tgt), y)``) and activation checkpointing.

Batch inputs follow the library's convention: a dict is passed as keyword
arguments, a tuple (not a namedtuple) as positional arguments, anything else
as the one argument (:func:`forward`, :func:`_singletons`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

DT = torch.float64


@dataclass(frozen=True)
class Case:
    """One zoo entry.

    Attributes
    ----------
    name : str
    build : callable
        ``build() -> nn.Module``: a fresh float64 model, same weights on every call.
    batch : callable
        ``batch() -> (inputs, targets)``: the same data on every call.
    loss_fn : callable
        ``loss_fn(outputs, targets)``.
    train : bool
        Whether the case is meant to run with ``train=True`` (dropout on).
    tags : frozenset of str
        ``"rnn"``, ``"attention"``, ``"compile"``, ``"dict"``, ``"kfac-blind"``
        (weights used without calling their module), ``"tuple"`` (several
        positional inputs), ``"checkpoint"`` (activation checkpointing), ...
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[Any, torch.Tensor]]
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy
    train: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 6, c: int = 2, hw: int = 5, classes: int = 3, seed: int = 1):
    g = _gen(seed)
    return torch.randn(n, c, hw, hw, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _vectors(n: int = 6, d: int = 4, classes: int = 3, seed: int = 1):
    g = _gen(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _tokens(n: int = 5, t: int = 4, vocab: int = 7, classes: int = 3, seed: int = 1):
    g = _gen(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, classes, (n,), generator=g)


def _sequences(n: int = 5, t: int = 3, d: int = 4, classes: int = 3, seed: int = 1):
    g = _gen(seed)
    return torch.randn(n, t, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _channels_last_images():
    x, y = _images()
    return x.to(memory_format=torch.channels_last), y


def _dict_vectors():
    x, y = _vectors()
    return {"input_values": x}, y


def _padded_sequences():
    """Keyword inputs with a ``src_key_padding_mask`` (True: padding)."""
    x, y = _sequences()
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[0, 2:] = True
    mask[3, 1:] = True
    return {"x": x, "src_key_padding_mask": mask}, y


def _source_target(n: int = 4, s: int = 3, t: int = 2, d: int = 4, classes: int = 3, seed: int = 1):
    """Positional inputs ``(src, tgt)`` of an encoder-decoder: a tuple."""
    g = _gen(seed)
    src = torch.randn(n, s, d, generator=g, dtype=DT)
    tgt = torch.randn(n, t, d, generator=g, dtype=DT)
    return (src, tgt), torch.randint(0, classes, (n,), generator=g)


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = fn().to(DT)
        return model.eval()

    build.__name__ = fn.__name__
    return build


# -- builders -----------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn_bn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)
    )
    bn = model[1]
    bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
    bn.running_var.copy_(torch.tensor([1.7, 0.6, 1.1]))
    return model


def cnn_channels_last() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    return model.to(memory_format=torch.channels_last)


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(h + self.conv2(torch.tanh(self.conv1(h))))
        return self.head(h.mean(dim=(2, 3)))


class TransformerClassifier(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=6, dropout=dropout, batch_first=True
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


class MaskedEncoder(nn.Module):
    """``nn.TransformerEncoder`` with nested tensors enabled and a padding
    mask, mean-pooled over all positions: under ``no_grad`` in eval mode
    PyTorch's fast path returns zeros at padded positions, where the path
    with autograd returns values (the library measures the latter)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0,
                                           batch_first=True, norm_first=False)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x, src_key_padding_mask=src_key_padding_mask).mean(dim=1))


class AttentionClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


class EncoderDecoder(nn.Module):
    """``nn.Transformer`` (one encoder and one decoder layer) between input
    projections and a mean-pooled classification head, called with two
    positional tensors: ``model(src, tgt)``.

    Only the projections, the decoder's cross-attention and the head are
    trained (395 parameters): the dense references cost a pass per
    parameter, and the whole model's 1643 would add half a minute to the
    zoo.  Every derivative still runs through the frozen encoder and
    decoder (the source projection reaches the loss only through them)."""

    def __init__(self) -> None:
        super().__init__()
        self.src_proj = nn.Linear(4, 8)
        self.tgt_proj = nn.Linear(4, 8)
        self.transformer = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                          dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.transformer.requires_grad_(False)
        self.transformer.decoder.layers[0].multihead_attn.requires_grad_(True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.src_proj(src), self.tgt_proj(tgt)).mean(dim=1))


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Next-token classifier whose output layer reuses the input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens).mean(dim=1))))


class SparseEmbeddingClassifier(nn.Module):
    """Bag-of-tokens classifier on embeddings with sparse gradients
    (``sparse=True``: a recommender's or word-vector model's layout), one
    of them a direct per-token bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, sparse=True)
        self.bias = nn.Embedding(7, 3, sparse=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens).mean(dim=1))) + self.bias(tokens).mean(dim=1)


def weight_norm_mlp() -> nn.Module:
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))


def spectral_norm_mlp() -> nn.Module:
    return nn.Sequential(parametrizations.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))


class DictModel(nn.Module):
    """Hugging Face style: keyword inputs, a dict of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, input_values: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(input_values))
        return {"logits": self.classifier(h), "hidden": h}


def dict_loss(outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs["logits"], targets)


def pre_hook_mlp() -> nn.Module:
    model = mlp()
    # scales the input of the first layer: part of the function being measured
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    return model


def compiled_mlp() -> nn.Module:
    return torch.compile(mlp(), backend="eager")


class FrozenUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 5)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(x)))


class CountingModel(nn.Module):
    """Writes its buffers in ``forward`` in every mode (a call counter and an
    input EMA, as people write for monitoring)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.ema.mul_(0.9).add_(x.detach().mean(0), alpha=0.1)
        return self.net(x)


class CheckpointedBlock(nn.Module):
    """An input layer, a block run through non-reentrant activation
    checkpointing (its activations are recomputed in the backward pass, from
    the tensors the module holds *then*) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.pre(x))
        return self.head(checkpoint(self.block, h, use_reentrant=False))


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("mlp", _seeded(mlp), _vectors),
        Case("cnn_bn", _seeded(cnn_bn), _images),
        Case("cnn_channels_last", _seeded(cnn_channels_last), _channels_last_images),
        Case("resnet_block", _seeded(ResBlock), _images),
        Case("transformer", _seeded(TransformerClassifier), _sequences, tags=frozenset({"attention", "kfac-blind"})),
        Case("transformer_train", _seeded(TransformerClassifier), _sequences, train=True,
             tags=frozenset({"attention", "kfac-blind", "dropout"})),
        Case("masked_encoder", _seeded(MaskedEncoder), _padded_sequences,
             tags=frozenset({"attention", "kfac-blind"})),
        Case("attention", _seeded(AttentionClassifier), _sequences, tags=frozenset({"attention", "kfac-blind"})),
        Case("encoder_decoder", _seeded(EncoderDecoder), _source_target,
             tags=frozenset({"attention", "kfac-blind", "tuple"})),
        Case("lstm", _seeded(lambda: RecurrentClassifier(nn.LSTM)), _tokens, tags=frozenset({"rnn"})),
        Case("gru", _seeded(lambda: RecurrentClassifier(nn.GRU)), _tokens, tags=frozenset({"rnn"})),
        Case("tied_embeddings", _seeded(TiedLM), _tokens, tags=frozenset({"tied"})),
        Case("sparse_embeddings", _seeded(SparseEmbeddingClassifier), _tokens, tags=frozenset({"sparse"})),
        Case("weight_norm", _seeded(weight_norm_mlp), _vectors, tags=frozenset({"parametrized"})),
        Case("spectral_norm", _seeded(spectral_norm_mlp), _vectors, tags=frozenset({"parametrized"})),
        Case("dict_outputs", _seeded(DictModel), _dict_vectors,
             loss_fn=dict_loss, tags=frozenset({"dict"})),
        Case("pre_hook", _seeded(pre_hook_mlp), _vectors),
        Case("compiled", _seeded(compiled_mlp), _vectors, tags=frozenset({"compile"})),
        Case("frozen_unused", _seeded(FrozenUnused), _vectors, tags=frozenset({"unused"})),
        Case("buffer_in_forward", _seeded(CountingModel), _vectors, tags=frozenset({"buffer"})),
        Case("checkpointed", _seeded(CheckpointedBlock), _vectors, tags=frozenset({"checkpoint"})),
    ]
}


# -- ReLU twins: the rescaling symmetry of minimum sharpness -------------------
# Minimum sharpness is defined only for chains of Linear/Conv layers joined by
# positively homogeneous activations; the zoo's Tanh models are refused.  These
# twins swap the activation for ReLU (and pooling), so that the value is
# checked on the same machinery (dict outputs, hooks, buffers, compile, ...).


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def relu_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 3))


def relu_cnn_channels_last() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return model.to(memory_format=torch.channels_last)


class ReluDictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, input_values: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(input_values))
        return {"logits": self.classifier(h), "hidden": h}


def relu_pre_hook() -> nn.Module:
    model = relu_mlp()
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    return model


def relu_compiled() -> nn.Module:
    return torch.compile(relu_mlp(), backend="eager")


class ReluCounting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = relu_mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


RELU_CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("relu_mlp", _seeded(relu_mlp), _vectors),
        Case("relu_cnn", _seeded(relu_cnn), _images),
        Case("relu_cnn_channels_last", _seeded(relu_cnn_channels_last), _channels_last_images),
        Case("relu_dict_outputs", _seeded(ReluDictModel), _dict_vectors, loss_fn=dict_loss,
             tags=frozenset({"dict"})),
        Case("relu_pre_hook", _seeded(relu_pre_hook), _vectors),
        Case("relu_compiled", _seeded(relu_compiled), _vectors, tags=frozenset({"compile"})),
        Case("relu_buffer_in_forward", _seeded(ReluCounting), _vectors, tags=frozenset({"buffer"})),
    ]
}

#: Case names, for ``pytest.mark.parametrize``.
NAMES = list(CASES)
#: Cases without torch.compile (compile is slow: one or two tests use it).
FAST = [n for n in NAMES if "compile" not in CASES[n].tags]


def state(model: nn.Module) -> dict[str, Any]:
    """Everything the restore guarantee covers: values (bit patterns),
    storages, ``requires_grad``, ``.grad`` and modes."""
    return {
        "params": [(n, p.detach().clone(), p.data_ptr(), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        "buffers": [(n, b.detach().clone(), b.data_ptr()) for n, b in model.named_buffers()],
        "modes": [m.training for m in model.modules()],
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bit-identical parameters and buffers, same storages, flags and modes."""
    assert before["modes"] == after["modes"]
    for (n, v, ptr, req, g), (n2, v2, ptr2, req2, g2) in zip(before["params"], after["params"], strict=True):
        assert n == n2 and ptr == ptr2 and req == req2 and g is g2, n
        assert torch.equal(v, v2), n
    for (n, v, ptr), (n2, v2, ptr2) in zip(before["buffers"], after["buffers"], strict=True):
        assert n == n2 and ptr == ptr2, n
        assert torch.equal(v, v2), n


# -- batch inputs ---------------------------------------------------------------


def _arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the model for batch inputs: a dict is passed as
    keyword arguments, a tuple (not a namedtuple) as positional arguments,
    anything else as the one argument (the library's documented convention)."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return inputs, {}
    return (inputs,), {}


def forward(model: nn.Module, inputs: Any) -> Any:
    """The model called on batch inputs (see :func:`_arguments`)."""
    args, kwargs = _arguments(inputs)
    return model(*args, **kwargs)


def _sample(inputs: Any, i: int) -> Any:
    """Sample ``i`` of batch inputs as a batch of one: every tensor of a dict
    or tuple sliced along dimension 0, in the same container."""
    if isinstance(inputs, dict):
        return {k: v[i : i + 1] for k, v in inputs.items()}
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return tuple(v[i : i + 1] for v in inputs)
    return inputs[i : i + 1]


def _singletons(batch: tuple[Any, torch.Tensor]) -> list[tuple[Any, torch.Tensor]]:
    """The batch as a list of batches of one sample."""
    x, y = batch
    return [(_sample(x, i), y[i : i + 1]) for i in range(len(y))]


# -- independent references -----------------------------------------------------

#: Open :func:`_held` blocks (innermost last).
_HELD: list[contextlib.ExitStack] = []


@contextlib.contextmanager
def _held() -> Iterator[None]:
    """Inside the block, each reference evaluation (:func:`_call`) leaves
    its tensors in the module until the block ends, instead of restoring the
    module's own when the forward pass returns (as ``functional_call``
    does).  Gradients taken inside the block then see the evaluated values
    also where the backward pass runs the forward again: non-reentrant
    activation checkpointing recomputes a block from the tensors the module
    holds at backward time.  (A later evaluation in the same block replaces
    the values: differentiate each loss before evaluating the next.)"""
    with contextlib.ExitStack() as stack:
        _HELD.append(stack)
        try:
            yield
        finally:
            _HELD.pop()


def _reference_kernels():
    """Math SDPA kernel, no fused attention fast path: the only ones with a
    double backward (set here independently of the library); and a
    :func:`_held` block, so that gradients taken inside are those of the
    values evaluated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    stack.callback(torch.backends.mha.set_fastpath_enabled, previous)
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    # weight_norm's fused kernel has a wrong (asymmetric) double backward on
    # CPU: the reference uses w = g v / ||v|| written out.
    fused = torch._weight_norm
    torch._weight_norm = lambda v, g, dim=0: v * (g / torch.norm_except_dim(v, 2, dim))
    stack.callback(setattr, torch, "_weight_norm", fused)
    stack.enter_context(_held())
    return stack


@contextlib.contextmanager
def _dense_embeddings(model: nn.Module) -> Iterator[None]:
    # references differentiate through dense embedding gradients (the same
    # values as sparse ones, in a layout every autograd function accepts)
    sparse = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True


def _call(model: nn.Module, state: dict[str, torch.Tensor], inputs: Any) -> Any:
    """The model's outputs with the tensors of ``state`` in place of its own
    (``torch.func.functional_call``); inside a :func:`_held` block the
    tensors stay in the module until the block ends."""
    from torch.func import functional_call

    args, kwargs = _arguments(inputs)
    if _HELD:
        # functional_call's own context (tied weights followed, missing
        # names left to the module), entered for the rest of the block
        from torch.nn.utils.stateless import _reparametrize_module

        stack = _HELD[-1]
        stack.enter_context(_dense_embeddings(model))
        stack.enter_context(_reparametrize_module(model, state, tie_weights=True, strict=False))
        return model(*args, **kwargs)
    with _dense_embeddings(model):
        return functional_call(model, state, args, kwargs, strict=False)


def flat_loss(case: Case, model: nn.Module, batch: tuple[Any, torch.Tensor]):
    """``(f, w0, names)``: the loss as a function of one flat vector of the
    trainable parameters, with fresh copies of the buffers on every call."""
    import copy

    model = copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    inputs, targets = batch

    def f(w: torch.Tensor) -> torch.Tensor:
        state, i = {}, 0
        for n, s in zip(names, shapes):
            state[n] = w[i : i + s.numel()].reshape(s)
            i += s.numel()
        for n, b in model.named_buffers():
            state[n] = b.clone()
        return case.loss_fn(_call(model, state, inputs), targets)

    return f, w0, names, model


def dense_hessian(case: Case, model: nn.Module, batch: tuple[Any, torch.Tensor], *, seed: int = 0) -> torch.Tensor:
    """The float64 Hessian of the loss in the trainable parameters by
    ``torch.autograd.functional.hessian`` (double backward), in the case's
    mode; dropout masks drawn after ``torch.manual_seed(seed)`` as the
    library's double-backward engine draws them."""
    f, w0, _, ref = flat_loss(case, model, batch)
    ref.train(case.train)
    with _reference_kernels(), torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.autograd.functional.hessian(f, w0)


def per_sample_gradients(case: Case, model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
    """``(n, p)`` per-sample gradients of the loss on batches of one, by a
    plain loop of ``torch.autograd.grad`` (eval mode)."""
    _, w0, _, ref = flat_loss(case, model, batch)
    ref.eval()
    inputs, targets = batch
    rows = []
    with _reference_kernels():
        for i in range(len(targets)):
            f, _, _, _ = flat_loss(case, ref, (_sample(inputs, i), targets[i : i + 1]))
            w = w0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(w), w, allow_unused=True)
            rows.append(torch.zeros_like(w0) if g is None else g)
    return torch.stack(rows)


def dense_ggn(case: Case, model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
    """The generalized Gauss-Newton matrix ``J^T H_z J`` of the loss in the
    trainable parameters, from the dense Jacobian of the outputs
    (``torch.autograd.functional.jacobian``) and the dense Hessian of the
    loss in the outputs (eval mode, one tensor of outputs)."""
    import copy

    model = copy.deepcopy(model).eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    inputs, targets = batch

    def outputs(w: torch.Tensor) -> torch.Tensor:
        state, i = {}, 0
        for (n, _), s in zip(named, shapes):
            state[n] = w[i : i + s.numel()].reshape(s)
            i += s.numel()
        for n, b in model.named_buffers():
            state[n] = b.clone()
        return _call(model, state, inputs)

    with _reference_kernels():
        z0 = outputs(w0).detach()
        J = torch.autograd.functional.jacobian(lambda w: outputs(w).reshape(-1), w0)
        Hz = torch.autograd.functional.hessian(lambda z: case.loss_fn(z.reshape(z0.shape), targets),
                                               z0.reshape(-1))
    return J.T @ Hz @ J
