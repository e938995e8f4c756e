"""Built-in experiments: each end to end at a tiny size, resume equivalence, config errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import robustclip as rc
from robustclip.data import write_fake_cifar
from robustclip.experiments import list_experiments, load_problem, make_config
from robustclip.experiments._config import apply_overrides, config_from_dict, parse_set_args
from robustclip.experiments._run import TIME_KEYS, Interrupted, load_run
from robustclip.experiments._runner import run_experiment as _run_experiment


def run_experiment(*args, **kwargs):
    # one thread: the models are tiny, and on a shared machine more threads only spin
    kwargs.setdefault("threads", 1)
    return _run_experiment(*args, **kwargs)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text("the quick brown fox jumps over the lazy dog.\n" * 80)
    return str(p)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=48, n_test=16, seed=0)
    write_fake_cifar(root, "cifar100", n_train=48, n_test=16, seed=1, archive=True)
    return str(root)


def tiny(name: str, text_file: str = "", cifar_dir: str = "") -> dict[str, str]:
    """Overrides that make experiment ``name`` run in a second or two."""
    return {
        "synthetic-noise": {"seeds": "3", "steps": "10", "regimes": "gaussian,pareto:1.1", "batch_size": "4"},
        "label-noise": {"epochs": "2", "seeds": "1", "hidden": "16", "batch_size": "64"},
        "accumulation": {
            "data": text_file, "steps": "4", "d": "16", "layers": "1", "heads": "2", "block_size": "16",
            "micro_batch": "4", "accumulation": "2", "eval_every": "2", "eval_batches": "2", "device": "cpu",
        },
        "spectral-mlp": {"n_train": "256", "n_test": "64", "width": "8", "depth": "2", "epochs": "1", "eval_every": "4"},
        "sgc": {"hidden": "32", "epochs": "2", "sweep_lrs": "0.1,1000", "sweep_epochs": "1", "batch_size": "128"},
        "cifar100-alexnet": {"data_dir": cifar_dir, "alexnet_hidden": "16", "epochs": "1", "batch_size": "16", "workers": "0", "log_every": "1"},
        "cifar10-resnet18": {"data_dir": cifar_dir, "width": "4", "epochs": "1", "batch_size": "16", "workers": "0"},
        "cifar10-spectral": {"data_dir": cifar_dir, "width": "4", "epochs": "1", "batch_size": "16", "workers": "0", "rank": "2"},
    }[name]


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]


def _methods_of(cfg) -> tuple[str, ...]:
    return tuple(getattr(cfg, "methods", None) or cfg.arms)


@pytest.mark.parametrize("name", list_experiments())
def test_each_experiment_end_to_end(name, tmp_path, text_file, cifar_dir):
    overrides = tiny(name, text_file, cifar_dir)
    out = run_experiment(name, overrides, out=tmp_path / name, quiet=True, progress=False)
    files = {p.name for p in out.iterdir()}
    assert {"config.toml", "config.json", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoint.pt", "run.json"} <= files
    assert any(f.endswith(".png") for f in files)
    run = load_run(out)
    assert run.experiment == name and run.records
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # every method of the config produced records
    cfg = make_config(name, overrides)
    assert {r["method"] for r in run.records if "method" in r} == set(_methods_of(cfg))
    # the CSV holds the same records as the JSONL
    csv_rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == len(run.records) + 1
    # the saved config reads back to the same config
    assert config_from_dict(type(cfg), json.loads((out / "config.json").read_text())) == cfg


def test_label_noise_records(tmp_path):
    out = run_experiment("label-noise", tiny("label-noise"), out=tmp_path / "ln", quiet=True)
    recs = [r for r in _records(out) if r["kind"] == "epoch"]
    assert len(recs) == 3 * 2  # three methods, two epochs
    ps = [r for r in recs if r["method"] == "PS-Clip-SGD"]
    assert all(r["ps_norm_mean"] > 0 and 0 <= r["clipped_fraction"] <= 1 for r in ps)
    assert all("ps_norm_mean" not in r for r in recs if r["method"] == "SGDM")
    summary = json.loads((out / "summary.json").read_text())
    budget = summary["equal_time_budget_s"]
    assert budget == pytest.approx(min(s["time_s"] for s in summary["methods"].values()))
    for m, s in summary["methods"].items():
        # accuracy at equal time is the last evaluation within the budget
        rs = [r for r in recs if r["method"] == m]
        within = [r for r in rs if r["time"] <= budget * (1 + 1e-9)] or rs[:1]
        assert s["test_acc_at_equal_time"] == within[-1]["test_acc"]


def test_synthetic_noise_gradient_is_the_analytic_one(tmp_path):
    from robustclip.experiments.synthetic_noise import NoisyObjective

    m = NoisyObjective(dim=5, a=2.0, sigma=0.5, x0=0.7)
    xi = torch.randn(3, 5)
    (g,) = torch.autograd.grad(m(xi)[1], m.x)
    x = torch.full((5,), 0.7)
    assert torch.allclose(g, x + 2.0 * torch.sin(2 * x) + 0.5 * xi[1], atol=1e-6)
    assert torch.allclose(m.true_grad(), x + 2.0 * torch.sin(2 * x))

    cfg = tiny("synthetic-noise")
    out = run_experiment("synthetic-noise", cfg, out=tmp_path / "sn", quiet=True)
    runs = [r for r in _records(out) if r["kind"] == "run"]
    assert len(runs) == 2 * 3 * 3  # regimes x methods x seeds
    c = make_config("synthetic-noise", cfg)
    g0 = math.sqrt(c.dim) * abs(c.x0 + c.a * math.sin(2 * c.x0))
    for r in runs:
        assert len(r["grad_norms"]) == c.steps
        assert r["grad_norms"][0] == pytest.approx(g0, rel=1e-5)  # every run starts at x0
        assert r["avg_grad_norm"] == pytest.approx(sum(r["grad_norms"]) / c.steps, rel=1e-4)
    q = json.loads((out / "summary.json").read_text())["avg_grad_norm_quantiles"]
    assert set(q) == {"gaussian", "pareto:1.1"}


def test_rank1_noise_transform():
    from robustclip.experiments.spectral_mlp import Rank1HeavyTailedNoise

    params = [torch.zeros(6, 4), torch.zeros(4)]
    always = Rank1HeavyTailedNoise(p=1.0, alpha=1.1, scale=5.0, seed=0)
    state = always.init(params)
    grads = [torch.zeros(6, 4), torch.zeros(4)]
    grads, state = always.update(grads, state, None)
    assert torch.linalg.matrix_rank(grads[0]) == 1  # a rank-1 spike on the matrix
    assert torch.count_nonzero(grads[1]) == 0  # vectors are left alone
    assert float(state.spikes) == 1.0
    never = Rank1HeavyTailedNoise(p=0.0, alpha=1.1, scale=5.0, seed=0)
    g2, _ = never.update([torch.ones(6, 4)], never.init(params), None)
    assert torch.equal(g2[0], torch.ones(6, 4))


def test_sgc_sweep_finds_the_diverging_step(tmp_path):
    out = run_experiment("sgc", tiny("sgc"), out=tmp_path / "sgc", quiet=True)
    s = json.loads((out / "summary.json").read_text())
    # a step of 1000 on cross-entropy with plain SGD diverges or stalls: never "stable"
    assert s["sweep"]["SGD"]["1000"]["stable"] is False
    rho = [r["rho_hat"] for r in _records(out) if r.get("part") == "main" and "rho_hat" in r]
    assert len(rho) == 3 * 3 and all(v >= 1 for v in rho)  # epochs 0..2, rho_hat >= 1 (Jensen)


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path / "checkpoint.pt", weights_only=False)
    return ck["last_finished"]["objects"]["model"]


@pytest.mark.parametrize(
    ("name", "overrides", "every", "stop"),
    [
        # stop mid-epoch of the second arm (PS-Clip-SGD: clipper and per-sample state)
        ("label-noise", {"methods": "SGDM,PS-Clip-SGD", "epochs": "3", "seeds": "1", "hidden": "16", "batch_size": "64"}, 5, 31),
        ("synthetic-noise", {"seeds": "2", "steps": "12", "regimes": "student:1.5", "methods": "Clip-SGD,PS-Clip-SGD"}, 4, 30),
        ("spectral-mlp", {"n_train": "256", "n_test": "64", "width": "8", "depth": "2", "epochs": "2", "eval_every": "3", "arms": "Clip-SGD,Spectral-Q85"}, 4, 23),
        ("accumulation", None, 2, 5),
    ],
)
def test_resume_gives_the_same_run(name, overrides, every, stop, tmp_path, text_file):
    if overrides is None:
        overrides = {**tiny("accumulation", text_file), "steps": "6", "methods": "Micro-Clip,Clip-after-acc"}
    full = run_experiment(name, overrides, out=tmp_path / "full", quiet=True, checkpoint_every=every)
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        run_experiment(name, overrides, out=part, quiet=True, checkpoint_every=every, interrupt_after=stop)
    # the kill came after the last checkpoint: lines written since are in the file, to be dropped
    ck = torch.load(part / "checkpoint.pt", weights_only=False)
    assert ck["arm"] is not None and len(_records(part)) >= ck["metrics_lines"]
    run_experiment(name, overrides, out=part, quiet=True, checkpoint_every=every, resume=True)
    assert _strip(_records(part)) == _strip(_records(full))
    a, b = _final_weights(full), _final_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "summary.json").read_text()).keys() == json.loads((full / "summary.json").read_text()).keys()


def test_resume_after_a_real_kill(tmp_path):
    """SIGKILL a ``robustclip run`` process mid-arm, resume it, and compare with a clean run."""
    overrides = {"methods": "PS-Clip-SGD", "epochs": "40", "seeds": "1", "hidden": "16", "batch_size": "64"}
    args = [f"{k}={v}" for k, v in overrides.items()]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "robustclip", "run", "label-noise", "--out", str(out), "--no-progress", "--checkpoint-every", "50"]
    for a in args:
        cmd += ["--set", a]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ck = out / "checkpoint.pt"
            if ck.exists() and torch.load(ck, weights_only=False)["arm"] is not None:
                break
            if proc.poll() is not None:
                pytest.skip("the run finished before it could be killed (machine too fast)")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if (out / "summary.json").exists():
        pytest.skip("the run finished before it could be killed (machine too fast)")
    run_experiment("label-noise", overrides, out=out, resume=True, quiet=True)
    clean = run_experiment("label-noise", overrides, out=tmp_path / "clean", quiet=True)
    assert _strip(_records(out)) == _strip(_records(clean))
    a, b = _final_weights(out), _final_weights(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- config errors --------------------------------------------------------------------------------


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"(?s)unknown config key 'epoch'.*epochs: int = 40"):
        make_config("label-noise", {"epoch": "3"})


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [("epochs", "three", "expects an int"), ("lr", "fast", "expects a float"), ("seeds", "1.5", "expects an int"),
     ("methods", "", "no methods"), ("label_noise", "1.5", "label_noise must be in")],
)
def test_bad_values(key, value, expect):
    with pytest.raises((TypeError, ValueError), match=expect):
        make_config("label-noise", {key: value})


def test_types_parse():
    cfg = make_config("sgc", {"sweep_lrs": "0.1, 1e3", "hidden": "8,8,8", "lr": "2"})
    assert cfg.sweep_lrs == (0.1, 1000.0) and cfg.hidden == (8, 8, 8) and cfg.lr == 2.0
    cfg = make_config("cifar10-resnet18", {"amp": "true", "cosine": "no"})
    assert cfg.amp is True and cfg.cosine is False
    with pytest.raises(TypeError, match="expects a bool"):
        make_config("cifar10-resnet18", {"amp": "maybe"})
    # typed values (TOML) are checked too: a string where a number belongs is refused
    with pytest.raises(TypeError, match="expects an int"):
        config_from_dict(type(make_config("sgc")), {"epochs": "3"})
    assert parse_set_args(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError, match="key=value"):
        parse_set_args(["novalue"])


def test_unknown_method_and_experiment():
    with pytest.raises(ValueError, match=r"unknown method 'Adam'.*SGDM"):
        make_config("label-noise", {"methods": "SGDM,Adam"})
    with pytest.raises(ValueError, match="unknown experiment"):
        make_config("mnist", {})


def test_toml_config_and_resume_guards(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 1\nhidden = 8\nmethods = ["SGDM"]\nseeds = 1\n')
    out = run_experiment("label-noise", None, config_file=toml, out=tmp_path / "r", quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["methods"] == ["SGDM"]
    toml.write_text('epochs = "one"\n')
    with pytest.raises(TypeError, match="expects an int"):
        run_experiment("label-noise", None, config_file=toml, out=tmp_path / "r2", quiet=True)
    # a finished run directory is not overwritten, and a resume keeps its config
    with pytest.raises(ValueError, match="already holds a run"):
        run_experiment("label-noise", {"epochs": "1"}, out=out, quiet=True)
    with pytest.raises(ValueError, match="config it was started with"):
        run_experiment("label-noise", {"epochs": "2"}, out=out, resume=True, quiet=True)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        run_experiment("label-noise", None, out=tmp_path / "empty", resume=True, quiet=True)
    with pytest.raises(ValueError, match="holds a run of 'label-noise'"):
        run_experiment("sgc", None, out=out, resume=True, quiet=True)


def test_apply_overrides_python():
    cfg = make_config("label-noise")
    new = apply_overrides(cfg, {"epochs": 5, "methods": ["SGDM"]}, from_string=False)
    assert new.epochs == 5 and new.methods == ("SGDM",) and cfg.epochs == 40


# -- problems for other tools ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["label-noise", "synthetic-noise", "spectral-mlp", "sgc", "accumulation", "cifar10-resnet18"])
def test_load_problem(name, text_file, cifar_dir):
    overrides = {"accumulation": {"data": text_file, "block_size": "16", "d": "16", "heads": "2", "layers": "1"},
                 "cifar10-resnet18": {"data_dir": cifar_dir, "width": "4"}}.get(name)
    p = load_problem(name, overrides)
    x, y = p.train
    assert x.shape[0] == y.shape[0] and p.batch_size >= 1 and p.lr > 0
    losses = p.loss_fn(p.model(x[:4]), y[:4])
    assert losses.shape == (4,)
    # the problem trains with the library as given
    opt = torch.optim.SGD(p.model.parameters(), lr=p.lr)
    with rc.Clipper(p.model, opt, rc.per_sample_clip(1.0, engine="vmap")) as clipper:
        clipper.backward(p.loss_fn(p.model(x[:4]), y[:4]))
        info = clipper.step()
    assert info.per_sample_norms.shape == (4,)


def test_label_noise_problem_has_the_noise():
    p = load_problem("label-noise", {"label_noise": "0.4", "seed": "2"})
    clean = load_problem("label-noise", {"label_noise": "0.0", "seed": "2"})
    frac = float((p.train[1] != clean.train[1]).double().mean())
    assert frac == pytest.approx(0.4, abs=0.002)
    assert torch.equal(p.test[1], clean.test[1])


# -- the CIFAR models -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18-group", "alexnet"])
def test_cifar_models_per_sample_matches_the_loop_oracle(name):
    from robustclip.models import AlexNet, ResNet18

    def make():
        return ResNet18(10, norm="group", width=4) if name == "resnet18-group" else AlexNet(10, hidden=8)

    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    norms, grads = [], []
    for engine in ("auto", "loop"):
        torch.manual_seed(1)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with rc.Clipper(model, opt, rc.per_sample_clip(0.5, engine=engine)) as clipper:
            clipper.backward(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
            info = clipper.step()
        norms.append(info.per_sample_norms)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(norms[0], norms[1], rtol=1e-4, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_resnet_batchnorm_variant():
    from robustclip.models import ResNet18

    bn = ResNet18(10, norm="batch", width=4)
    with pytest.raises(ValueError, match="BatchNorm"):
        rc.Clipper(bn, torch.optim.SGD(bn.parameters(), lr=0.1), rc.per_sample_clip(1.0)).backward(
            bn(torch.randn(2, 3, 32, 32)).sum(1)
        )
    gn = rc.convert_batchnorm_to_groupnorm(ResNet18(10, norm="batch", width=4))
    ref = ResNet18(10, norm="group", width=4)
    assert [(n, p.shape) for n, p in gn.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert ResNet18(10, width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
