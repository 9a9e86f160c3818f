"""``python -m flatness``: loading, options, JSON, errors.

Every value the command line prints is checked against the library called
directly on the same batches, or against dense float64 Hessians.
"""

import json
import os
import subprocess
import sys
import textwrap

import cases
import numpy as np
import pytest
import torch
from torch import nn

import flatness
from flatness._cli import main

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp(width=6, dtype="float32"):
        torch.manual_seed(123)  # the checkpoint overwrites these weights anyway
        return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3)).to(getattr(torch, dtype))

    class Zoo:
        @staticmethod
        def tanh_net():
            return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def not_a_model():
        return 3

    def noted(width=6, **notes):
        return mlp(width)
    """
)


def _model(width=6, dtype=torch.float32):
    return cases.mlp(7, (4, width, 3), act=nn.ReLU, dtype=dtype)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cli_models.py").write_text(MODELS)
    model = _model()
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    torch.save((x, y), tmp_path / "data.pt")
    np.savez(tmp_path / "data.npz", inputs=x.numpy(), targets=y.numpy().astype(np.int32))
    return tmp_path, model, x, y


def _run(argv, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main([*argv, "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""  # all of it went to the file
    return json.loads(out.read_text())


def _batches(x, y, n, bs):
    return list(zip(x[:n].split(bs), y[:n].split(bs)))


def test_sharpness_from_py_file_matches_library(files, capsys):
    tmp, model, x, y = files
    doc = _run(
        ["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", str(tmp / "ckpt.pt"),
         "--data", str(tmp / "data.pt"), "--batch-size", "16", "--kind", "l2", "--rho", "0.05",
         "--n-iters", "7", "--seed", "3"],
        tmp, capsys,
    )
    ref = flatness.sharpness(model, _batches(x, y, 40, 16), kind="l2", rho=0.05, n_iters=7, seed=3)
    r = doc["result"]
    assert r["kind"] == "l2" and r["settings"]["n_iters"] == 7
    assert r["batch_sizes"] == [16, 16, 8]
    assert r["value"] == ref.value and r["per_batch"] == ref.per_batch
    assert r["clean_loss"] == ref.clean_loss
    assert r["value"] > 0
    with torch.no_grad():
        assert doc["accuracy"] == pytest.approx(float((model(x).argmax(1) == y).float().mean()))
    assert doc["n_eval"] == 40 and doc["batch_size"] == 16
    # the document records the command line it was given, not the host
    # process's (here pytest's)
    assert doc["argv"][:3] == ["sharpness", "--model", f"{tmp}/cli_models.py:mlp"]
    assert doc["argv"][-2:] == ["--output", str(tmp / "out.json")]


def test_reference_evaluator_spelling_and_npz(files, capsys, monkeypatch):
    tmp, model, x, y = files
    monkeypatch.syspath_prepend(str(tmp))
    # a checkpoint saved from a DDP model, wrapped in a training dict
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp / "ddp.pt")
    doc = _run(
        ["sharpness", "--model", "cli_models:mlp", "--model_path", str(tmp / "ddp.pt"),
         "--data", str(tmp / "data.npz"), "--n_eval_sharpness", "24", "--bs_sharpness", "8",
         "--rho", "0.01", "--adaptive", "--normalize_logits", "--n_iters", "5",
         "--algorithm", "m_apgd_linf"],
        tmp, capsys,
    )
    ref = flatness.sharpness(model, _batches(x, y, 24, 8), kind="adaptive_linf", rho=0.01,
                             n_iters=5, normalize_logits=True)
    r = doc["result"]
    assert r["kind"] == "adaptive_linf" and r["settings"]["normalize_logits"] is True
    assert r["batch_sizes"] == [8, 8, 8]
    assert r["value"] == ref.value


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_checkpoint_of_a_compiled_model_loads(files, capsys, prefix):
    """``torch.compile(model).state_dict()`` names every tensor
    ``_orig_mod.<name>`` (inside or around a DDP wrapper's ``module.``);
    such a checkpoint loads into the plain model the factory builds."""
    tmp, model, x, y = files
    torch.save({f"{prefix}{k}": v for k, v in model.state_dict().items()}, tmp / "compiled.pt")
    doc = _run(["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", str(tmp / "compiled.pt"),
                "--data", str(tmp / "data.pt"), "--kind", "l2", "--rho", "0.05", "--n-iters", "3"], tmp, capsys)
    ref = flatness.sharpness(model, _batches(x, y, 40, 128), kind="l2", rho=0.05, n_iters=3)
    assert doc["result"]["value"] == ref.value
    # a model whose own submodule is named "module" keeps its names
    (tmp / "wrapped_models.py").write_text(
        "from torch import nn\nfrom cli_models import mlp\n\n"
        "class Wrap(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.module = mlp()\n\n    def forward(self, x):\n        return self.module(x)\n")
    torch.save({f"{prefix}module.{k}": v for k, v in model.state_dict().items()}, tmp / "wrapped.pt")
    doc = _run(["sharpness", "--model", f"{tmp}/wrapped_models.py:Wrap", "--checkpoint", str(tmp / "wrapped.pt"),
                "--data", str(tmp / "data.pt"), "--kind", "l2", "--rho", "0.05", "--n-iters", "3"], tmp, capsys)
    assert doc["result"]["value"] == ref.value


def test_layer_name_pattern_is_the_reference_spelling_of_params(files, capsys):
    """The guide lists ``--layer_name_pattern`` among the reference
    evaluator's spellings that are accepted: it selects what ``--params``
    selects."""
    tmp, model, x, y = files
    common = ["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", str(tmp / "ckpt.pt"),
              "--data", str(tmp / "data.pt"), "--kind", "l2", "--rho", "0.05", "--n-iters", "3"]
    doc = _run([*common, "--layer_name_pattern", "2.weight"], tmp, capsys)
    assert doc["result"]["settings"]["params"] == ["2.weight"]
    assert doc["result"]["value"] == _run([*common, "--params", "2.weight"], tmp, capsys)["result"]["value"]


@pytest.mark.parametrize(("algorithm", "adaptive", "kind"), [
    ("m_apgd_l2", False, "l2"), ("avg_l2", True, "avg_adaptive_l2"), ("avg_linf", False, "avg_linf"),
])
def test_algorithm_names_map_to_kinds(files, capsys, algorithm, adaptive, kind):
    tmp, model, x, y = files
    argv = ["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", str(tmp / "ckpt.pt"),
            "--data", str(tmp / "data.pt"), "--algorithm", algorithm, "--rho", "0.02",
            "--n-iters", "2", "--n-samples", "3"]
    if kind.startswith("avg"):
        argv.remove("--n-iters"), argv.remove("2")
    else:
        argv.remove("--n-samples"), argv.remove("3")
    doc = _run(argv + (["--adaptive"] if adaptive else []), tmp, capsys)
    assert doc["result"]["kind"] == kind


def test_model_kwargs_dtype_params_and_m(files, capsys):
    tmp, _, x, y = files
    model = _model(width=6)
    doc = _run(
        ["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--model-kwargs", '{"width": 6}',
         "--checkpoint", str(tmp / "ckpt.pt"), "--data", str(tmp / "data.pt"), "--dtype", "float64",
         "--params", r"^2\.", "--kind", "avg_l2", "--rho", "0.1", "--n-samples", "4", "--m", "5",
         "--batch-size", "20"],
        tmp, capsys,
    )
    model64 = model.double()
    ref = flatness.sharpness(model64, _batches(x, y, 40, 20), kind="avg_l2", rho=0.1, n_samples=4, m=5,
                             params=["2.weight", "2.bias"])
    r = doc["result"]
    assert r["settings"]["params"] == ["2.weight", "2.bias"] and r["settings"]["dtype"] == "torch.float64"
    assert r["settings"]["m"] == 5
    assert r["value"] == pytest.approx(ref.value, rel=1e-12, abs=1e-15)


def test_output_is_strict_json_with_non_finite_model_kwargs(files, capsys):
    # Python's JSON reader takes NaN in --model-kwargs and its writer would
    # echo it as a bare NaN token, which strict readers refuse
    tmp, _, _, _ = files
    doc = _run(
        ["sharpness", "--model", f"{tmp}/cli_models.py:noted", "--model-kwargs",
         '{"note": NaN, "hi": Infinity, "lo": [-Infinity, 1.5]}', "--checkpoint", str(tmp / "ckpt.pt"),
         "--data", str(tmp / "data.pt"), "--kind", "avg_l2", "--rho", "0.1", "--n-samples", "2"],
        tmp, capsys,
    )
    text = (tmp / "out.json").read_text()

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads(text, parse_constant=refuse)
    assert doc["model_kwargs"] == {"note": "NaN", "hi": "Infinity", "lo": ["-Infinity", 1.5]}


def test_checkpoint_of_a_training_wrapper_loads_the_model_entries(files, capsys):
    # A LightningModule's "state_dict" names the network's entries under
    # the attribute holding it ("model."), beside other modules' entries
    tmp, model, x, y = files
    wrapper = {f"model.{k}": v for k, v in model.state_dict().items()}
    wrapper["criterion.weight"] = torch.ones(3)
    torch.save({"state_dict": wrapper, "epoch": 3}, tmp / "wrapped.ckpt")
    argv = ["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--data", str(tmp / "data.pt"),
            "--kind", "avg_l2", "--rho", "0.1", "--n-samples", "2"]
    wrapped = _run([*argv, "--checkpoint", str(tmp / "wrapped.ckpt")], tmp, capsys)
    plain = _run([*argv, "--checkpoint", str(tmp / "ckpt.pt")], tmp, capsys)
    assert wrapped["result"]["value"] == plain["result"]["value"]
    assert wrapped["result"]["clean_loss"] == plain["result"]["clean_loss"]
    # entries that fit no attribute exactly are still refused
    del wrapper["model.0.bias"]
    torch.save({"state_dict": wrapper}, tmp / "partial.ckpt")
    with pytest.raises(SystemExit):
        main([*argv, "--checkpoint", str(tmp / "partial.ckpt")])
    assert "does not fit the model" in capsys.readouterr().err


def _dense_hessian(model, x, y):
    params = [p.detach().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss(v):
        out, i = {}, 0
        for (name, _), s in zip(model.named_parameters(), shapes):
            n = int(torch.tensor(s).prod())
            out[name] = v[i:i + n].reshape(s)
            i += n
        z = torch.func.functional_call(model, out, (x,))
        return nn.functional.cross_entropy(z, y)

    return torch.autograd.functional.hessian(loss, flat)


def test_hessian_eigenvalues_and_trace_against_dense(files, capsys):
    tmp, model, x, y = files
    base = ["hessian", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", str(tmp / "ckpt.pt"),
            "--data", str(tmp / "data.pt"), "--dtype", "float64", "--batch-size", "40"]
    dense = _dense_hessian(model.double(), x.double(), y)
    evals = torch.linalg.eigvalsh(dense).flip(0)
    doc = _run([*base, "--quantity", "eigenvalues", "--k", "2", "--tol", "1e-10"], tmp, capsys)
    assert doc["result"]["quantity"] == "eigenvalues"
    np.testing.assert_allclose(doc["result"]["eigenvalues"], evals[:2].numpy(), rtol=1e-7)
    doc = _run([*base, "--quantity", "trace", "--method", "exact"], tmp, capsys)
    assert doc["result"]["value"] == pytest.approx(float(dense.trace()), rel=1e-10)


def test_hessian_density_and_minimum(files, capsys):
    tmp, model, x, y = files
    base = ["hessian", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", str(tmp / "ckpt.pt"),
            "--data", str(tmp / "data.pt"), "--dtype", "float64"]
    doc = _run([*base, "--quantity", "density", "--n-vectors", "2", "--n-steps", "8"], tmp, capsys)
    r = doc["result"]
    assert len(r["grid"]) == len(r["density"]) and np.shape(r["nodes"]) == (2, 8)
    assert r["settings"]["low_memory"] is False
    # without a basis: the same quadrature moments to rounding
    lean = _run([*base, "--quantity", "density", "--n-vectors", "2", "--n-steps", "8", "--low-memory"], tmp, capsys)
    assert lean["result"]["settings"]["low_memory"] is True
    for p in (1, 2):
        want = (np.asarray(r["weights"]) * np.asarray(r["nodes"]) ** p).sum()
        got = (np.asarray(lean["result"]["weights"]) * np.asarray(lean["result"]["nodes"]) ** p).sum()
        assert got == pytest.approx(want, rel=1e-8)
    lean = _run([*base, "--quantity", "eigenvalues", "--k", "2", "--low-memory"], tmp, capsys)
    assert lean["result"]["settings"]["low_memory"] is True and len(lean["result"]["eigenvalues"]) == 2
    # a basis of 3 vectors, restarted: the eigenvalues of the unbounded run
    full = _run([*base, "--quantity", "eigenvalues", "--k", "2", "--tol", "1e-10"], tmp, capsys)
    bounded = _run([*base, "--quantity", "eigenvalues", "--k", "2", "--tol", "1e-10", "--max-basis", "3",
                    "--max-iter", "3000"], tmp, capsys)
    assert bounded["result"]["settings"]["max_basis"] == 3 and bounded["result"]["n_iter"] > 3
    np.testing.assert_allclose(bounded["result"]["eigenvalues"], full["result"]["eigenvalues"], rtol=1e-9)
    doc = _run([*base, "--quantity", "minimum", "--method", "exact", "--granularity", "layer"], tmp, capsys)
    ref = flatness.hessian.minimum_sharpness(model.double(), _batches(x, y, 40, 128), method="exact")
    assert doc["result"]["value"] == pytest.approx(ref.value, rel=1e-10)
    assert doc["result"]["value"] <= doc["result"]["trace"] + 1e-12


def test_stdout_by_default(files, capsys):
    tmp, *_ = files
    assert main(["sharpness", "--model", f"{tmp}/cli_models.py:Zoo.tanh_net", "--data", str(tmp / "data.pt"),
                 "--kind", "linf", "--rho", "0.01", "--n-iters", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"]["kind"] == "linf" and doc["checkpoint"] is None


def _error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_errors_are_one_line_messages(files, capsys):
    tmp, model, *_ = files
    m, d = f"{tmp}/cli_models.py:mlp", str(tmp / "data.pt")
    assert "module:factory" in _error(["sharpness", "--model", "nocolon", "--data", d], capsys)
    assert "does not exist" in _error(["sharpness", "--model", f"{tmp}/nope.py:f", "--data", d], capsys)
    assert "cannot import" in _error(["sharpness", "--model", "no_such_mod_xyz:f", "--data", d], capsys)
    assert "no attribute" in _error(["sharpness", "--model", f"{tmp}/cli_models.py:zzz", "--data", d], capsys)
    assert "not a torch.nn.Module" in _error(
        ["sharpness", "--model", f"{tmp}/cli_models.py:not_a_model", "--data", d], capsys)
    assert "does not exist" in _error(["sharpness", "--model", m, "--data", str(tmp / "none.pt")], capsys)
    np.savez(tmp / "bad.npz", a=np.zeros(3), b=np.zeros(3))
    assert "x/y" in _error(["sharpness", "--model", m, "--data", str(tmp / "bad.npz")], capsys)
    (tmp / "data.csv").write_text("1,2\n")
    assert "unknown format" in _error(["sharpness", "--model", m, "--data", str(tmp / "data.csv")], capsys)
    torch.save(_model(width=9).state_dict(), tmp / "wrong.pt")
    assert "does not fit" in _error(
        ["sharpness", "--model", m, "--checkpoint", str(tmp / "wrong.pt"), "--data", d], capsys)
    assert "rho" in _error(["sharpness", "--model", m, "--data", d, "--kind", "l2"], capsys)
    assert "not both" in _error(
        ["sharpness", "--model", m, "--data", d, "--kind", "l2", "--algorithm", "m_apgd_l2", "--rho", "1"], capsys)
    assert "matches no" in _error(["sharpness", "--model", m, "--data", d, "--params", "xyz", "--rho", "1"], capsys)
    assert "--n-iters does not apply" in _error(["sharpness", "--model", m, "--data", d, "--kind", "hessian_trace",
                                                 "--n-iters", "3"], capsys)
    assert "not a device" in _error(["sharpness", "--model", m, "--data", d, "--device", "gpu9"], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA" in _error(["sharpness", "--model", m, "--data", d, "--device", "cuda"], capsys)
    assert "invalid choice" in _error(["sharpness", "--model", m, "--data", d, "--kind", "bogus"], capsys)


def test_unreadable_files_are_one_line_errors(files, capsys):
    """A data file or checkpoint that is not what its suffix says (a text
    file, an empty or truncated file) is reported in one line naming it,
    never with a traceback from torch.load or numpy.load."""
    tmp, *_ = files
    m, d, ckpt = f"{tmp}/cli_models.py:mlp", str(tmp / "data.pt"), str(tmp / "ckpt.pt")
    (tmp / "text.pt").write_text("hello\n")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "text.npz").write_text("hello\n")
    (tmp / "cut.npz").write_bytes((tmp / "data.npz").read_bytes()[:100])
    for name in ("text.pt", "empty.pt", "text.npz", "cut.npz"):
        err = _error(["sharpness", "--model", m, "--checkpoint", ckpt, "--data", str(tmp / name), "--rho", "0.1"],
                     capsys)
        assert "error:" in err and f"data file {str(tmp / name)!r}" in err, err
        assert "pickled" not in err, err  # not a pickle: nothing unsafe was refused
    for name in ("text.pt", "empty.pt"):
        err = _error(["sharpness", "--model", m, "--checkpoint", str(tmp / name), "--data", d, "--rho", "0.1"], capsys)
        assert f"checkpoint {str(tmp / name)!r}" in err and "torch.save" in err, err


def test_module_entry_point(files):
    tmp, *_ = files
    proc = subprocess.run(
        [sys.executable, "-m", "flatness", "sharpness", "--model", f"{tmp}/cli_models.py:mlp",
         "--checkpoint", str(tmp / "ckpt.pt"), "--data", str(tmp / "data.npz"), "--rho", "0.002",
         "--n-iters", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["result"]["kind"] == "adaptive_linf" and doc["result"]["value"] >= 0


def test_a_reader_that_stops_early_gets_no_traceback(files):
    # `flatness ... | head`: printing into the closed pipe raised
    # BrokenPipeError with a traceback
    tmp, *_ = files
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the result is printed
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flatness", "sharpness", "--model", f"{tmp}/cli_models.py:mlp",
             "--checkpoint", str(tmp / "ckpt.pt"), "--data", str(tmp / "data.npz"), "--rho", "0.002",
             "--n-iters", "1"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(files, capsys):
    tmp, *_ = files
    base = ["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", str(tmp / "ckpt.pt"),
            "--data", str(tmp / "data.pt"), "--dtype", "float64", "--kind", "avg_l2", "--rho", "0.05",
            "--n-samples", "3"]
    cpu = _run([*base, "--device", "cpu"], tmp, capsys)["result"]
    gpu = _run([*base, "--device", "cuda"], tmp, capsys)["result"]
    assert gpu["settings"]["device"].startswith("cuda")
    assert gpu["clean_loss"] == pytest.approx(cpu["clean_loss"], rel=1e-10)


# --------------------------------------------------------------------------
# the command line's promises, each checked by running it in a subprocess
# --------------------------------------------------------------------------


def _cli(args, cwd, *, launcher=("-m", "flatness"), env=None):
    proc = subprocess.run([sys.executable, *launcher, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=180, env=env)
    return proc


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len([ln for ln in lines if "error:" in ln]) == 1 and lines[-1].count("error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    assert proc.stdout == ""
    return lines[-1]


#: (arguments, the flag that does not apply, the choice it does not apply to)
NOT_APPLICABLE = [
    (["sharpness", "--kind", "avg_l2", "--rho", "0.1", "--n-iters", "3"], "--n-iters", "--kind avg_l2"),
    (["sharpness", "--kind", "avg_linf", "--rho", "0.1", "--restarts", "1"], "--restarts", "--kind avg_linf"),
    (["sharpness", "--kind", "l2", "--rho", "0.1", "--n-samples", "3"], "--n-samples", "--kind l2"),
    (["sharpness", "--kind", "hessian_trace", "--rho", "0.1"], "--rho", "--kind hessian_trace"),
    (["sharpness", "--kind", "hessian_max_eig", "--normalize-logits"], "--normalize-logits", "--kind hessian_max_eig"),
    (["hessian", "--quantity", "eigenvalues", "--n-vectors", "2"], "--n-vectors", "--quantity eigenvalues"),
    (["hessian", "--quantity", "eigenvalues", "--granularity", "layer"], "--granularity", "--quantity eigenvalues"),
    (["hessian", "--quantity", "eigenvalues", "--n-steps", "4"], "--n-steps", "--quantity eigenvalues"),
    (["hessian", "--quantity", "trace", "--k", "2"], "--k", "--quantity trace"),
    (["hessian", "--quantity", "density", "--method", "exact"], "--method", "--quantity density"),
    (["hessian", "--quantity", "trace", "--low-memory"], "--low-memory", "--quantity trace"),
    (["hessian", "--quantity", "trace", "--max-basis", "4"], "--max-basis", "--quantity trace"),
]


def _marking_factory(tmp):
    """A model factory that leaves a file behind when it runs."""
    marker = tmp / "factory_ran"
    (tmp / "marking.py").write_text(
        "import pathlib\nfrom cli_models import mlp\n"
        f"def make():\n    pathlib.Path({str(marker)!r}).touch()\n    return mlp()\n"
    )
    return marker


@pytest.mark.parametrize(("argv", "flag", "choice"), NOT_APPLICABLE)
def test_options_the_measurement_does_not_use_are_errors(files, capsys, monkeypatch, argv, flag, choice):
    tmp, *_ = files
    monkeypatch.syspath_prepend(str(tmp))
    marker = _marking_factory(tmp)
    err = _error([argv[0], "--model", f"{tmp}/marking.py:make", "--data", str(tmp / "data.pt"), *argv[1:]], capsys)
    assert len(err.strip().splitlines()) == 1 and f"{flag} does not apply to {choice}" in err
    assert not marker.exists()  # rejected before the model was built


@pytest.mark.parametrize("case", [0, 2, 3, 5])
def test_options_the_measurement_does_not_use_are_errors_in_a_subprocess(files, case):
    tmp, *_ = files
    argv, flag, choice = NOT_APPLICABLE[case]
    marker = _marking_factory(tmp)
    proc = _cli([argv[0], "--model", "marking:make", "--data", tmp / "data.pt", *argv[1:]], tmp)
    _one_line_error(proc, f"{flag} does not apply to {choice}")
    assert not marker.exists()


def test_progress_without_tqdm_is_a_one_line_error(files):
    tmp, *_ = files
    code = ("import sys; sys.modules['tqdm'] = None; from flatness._cli import main; "
            "sys.argv[0] = 'flatness'; sys.exit(main())")
    proc = _cli(["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--data", tmp / "data.pt", "--rho", "0.01",
                 "--progress"], tmp, launcher=("-c", code))
    _one_line_error(proc, "--progress needs tqdm")


def test_float_labels_are_a_clean_error(files):
    tmp, _, x, y = files
    np.savez(tmp / "float.npz", x=x.numpy(), y=y.numpy().astype(np.float64))
    proc = _cli(["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--data", tmp / "float.npz", "--rho", "0.01"],
                tmp)
    _one_line_error(proc, "float64", "integers")


@pytest.mark.parametrize("where", ["missing_dir/out.json", "."])
def test_unwritable_output_fails_before_the_measurement(files, where):
    tmp, *_ = files
    marker = _marking_factory(tmp)
    proc = _cli(["sharpness", "--model", "marking:make", "--data", tmp / "data.pt", "--rho", "0.01",
                 "--output", tmp / where], tmp)
    _one_line_error(proc, "--output")
    assert not marker.exists()


def test_console_script_imports_from_the_current_directory_and_says_flatness(files, tmp_path_factory):
    tmp, model, *_ = files
    # What pip writes for the `flatness` console script: the script's own
    # directory, not the current one, is first on sys.path.
    bindir = tmp_path_factory.mktemp("bin")
    script = bindir / "flatness"
    script.write_text("import sys\nfrom flatness.__main__ import main\nsys.exit(main())\n")
    (tmp / "mymodel.py").write_text("from cli_models import mlp as make\n")
    ok = _cli(["sharpness", "--model", "mymodel:make", "--checkpoint", tmp / "ckpt.pt", "--data", tmp / "data.pt",
               "--kind", "l2", "--rho", "0.01", "--n-iters", "1"], tmp, launcher=(str(script),))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["result"]["kind"] == "l2"
    bad = _cli(["sharpness", "--model", "mymodel:make", "--data", tmp / "data.pt"], tmp, launcher=(str(script),))
    line = _one_line_error(bad)
    assert line.startswith("flatness sharpness: error:") and "python -m" not in bad.stderr
    usage = _cli(["sharpness"], tmp, launcher=(str(script),))
    assert usage.returncode == 2 and usage.stderr.startswith("usage: flatness sharpness")
    # python -m flatness names itself so
    assert _cli(["sharpness"], tmp).stderr.startswith("usage: python -m flatness sharpness")


def test_missing_checkpoint_is_noted_on_stderr(files):
    tmp, *_ = files
    proc = _cli(["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--data", tmp / "data.pt", "--kind", "l2",
                 "--rho", "0.01", "--n-iters", "1"], tmp)
    assert proc.returncode == 0, proc.stderr
    assert "note: no --checkpoint given" in proc.stderr
    assert json.loads(proc.stdout)["checkpoint"] is None
    with_ckpt = _cli(["sharpness", "--model", f"{tmp}/cli_models.py:mlp", "--checkpoint", tmp / "ckpt.pt",
                      "--data", tmp / "data.pt", "--kind", "l2", "--rho", "0.01", "--n-iters", "1"], tmp)
    assert with_ckpt.returncode == 0 and "note:" not in with_ckpt.stderr


def test_pickled_model_and_dataset_say_what_to_save_instead(files):
    tmp, model, x, y = files
    torch.save(model, tmp / "whole_model.pt")
    torch.save(torch.utils.data.TensorDataset(x, y), tmp / "dataset.pt")
    m, d = f"{tmp}/cli_models.py:mlp", tmp / "data.pt"
    line = _one_line_error(_cli(["sharpness", "--model", m, "--checkpoint", tmp / "whole_model.pt", "--data", d,
                                 "--rho", "0.01"], tmp), "model.state_dict()")
    assert "weights_only" not in line
    line = _one_line_error(_cli(["sharpness", "--model", m, "--checkpoint", tmp / "ckpt.pt",
                                 "--data", tmp / "dataset.pt", "--rho", "0.01"], tmp), "numpy.savez")
    assert "TensorDataset" in line


def test_model_file_imports_its_sibling_modules(files):
    """``--model path/to/net.py:make`` runs the file as Python runs a script:
    its own directory is importable, so ``from layers import ...`` beside it
    works from any current directory."""
    tmp, *_ = files
    sub = tmp / "project" / "models"
    sub.mkdir(parents=True)
    (sub / "sibling_layers_for_cli_test.py").write_text(
        "from torch import nn\n\ndef head():\n    return nn.Linear(6, 3)\n")
    (sub / "net.py").write_text(
        "from torch import nn\nfrom sibling_layers_for_cli_test import head\n\n"
        "def make():\n    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), head())\n")
    for spec in ("project/models/net.py:make", f"{sub}/net.py:make"):
        proc = _cli(["sharpness", "--model", spec, "--checkpoint", tmp / "ckpt.pt", "--data", tmp / "data.pt",
                     "--kind", "l2", "--rho", "0.01", "--n-iters", "1"], tmp)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["result"]["kind"] == "l2"
