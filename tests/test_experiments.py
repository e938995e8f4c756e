"""Built-in experiments: each end to end at a tiny size, resume equivalence, config errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robustclip as rc
from robustclip.experiments import list_experiments, load_problem, make_config
from robustclip.experiments._config import apply_overrides, config_from_dict, parse_set_args
from robustclip.experiments._methods import METHODS, MethodParams, available_methods, build_method
from robustclip.experiments._run import TIME_KEYS, Interrupted, load_final_state, load_run
from robustclip.experiments._runner import run_experiment as _run_experiment
from robustclip.experiments.data import write_fake_cifar


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
        "demo": {"scale": "0.1", "seeds": "1", "methods": "SGDM,PS-Clip-SGD"},
        "synthetic-noise": {"seeds": "3", "steps": "10", "regimes": "gaussian,pareto:1.1", "batch_size": "4"},
        "label-noise": {"epochs": "2", "seeds": "1", "hidden": "16", "batch_size": "64"},
        "accumulation": {
            "data": text_file, "steps": "4", "d": "16", "layers": "1", "heads": "2", "block_size": "16",
            "micro_batch": "4", "accumulation": "2", "eval_every": "2", "eval_batches": "2", "device": "cpu",
        },
        "spectral-mlp": {"n_train": "256", "n_test": "64", "width": "8", "depth": "2", "epochs": "1", "eval_every": "4"},
        "sgc": {
            "hidden": "32", "epochs": "2", "sweep_lrs": "0.1,1000", "sweep_epochs": "1", "batch_size": "128",
            "bias_every": "2", "bias_draws": "3", "batch_sizes": "16,256", "batch_lrs": "1", "batch_steps": "4",
        },
        "cifar100-alexnet": {
            "data_dir": cifar_dir, "alexnet_hidden": "16", "epochs": "1", "batch_size": "16", "workers": "0", "log_every": "1",
            "amp": "true",  # bfloat16 autocast, on the CPU too
        },
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
    out = run_experiment("label-noise", {**tiny("label-noise"), "seeds": "2"}, out=tmp_path / "ln", quiet=True)
    recs = [r for r in _records(out) if r["kind"] == "epoch"]
    assert len(recs) == 3 * 3 * 2  # three methods, epochs 0..2, two seeds
    assert all(r["time"] == 0.0 for r in recs if r["epoch"] == 0)  # the untrained model, at time 0
    ps = [r for r in recs if r["method"] == "PS-Clip-SGD" and r["epoch"] > 0]
    assert all(r["ps_norm_mean"] > 0 and 0 <= r["clipped_fraction"] <= 1 for r in ps)
    # SGDM neither has per-sample norms nor clips: no reading rather than a made-up 0
    assert all("ps_norm_mean" not in r and "clipped_fraction" not in r for r in recs if r["method"] == "SGDM")
    assert all(r["clipped_fraction"] in (0.0, 0.5, 1.0) for r in recs if r["method"] == "Clip-SGD" and r["epoch"] > 0)
    summary = json.loads((out / "summary.json").read_text())
    # equal time, recomputed from the records: on each seed, walk the evaluations in time order
    # and stop at the first method to finish; each method is read at its latest epoch by then
    expected: dict[str, list[float]] = {}
    for seed in (0, 1):
        timeline = sorted((r for r in recs if r["seed"] == seed), key=lambda r: (r["time"], r["epoch"]))
        seen: dict[str, dict] = {}
        for r in timeline:
            seen[r["method"]] = r
            if r["epoch"] == 2:  # a method finished: the clock stops here
                stop = r["time"]
                break
        for r in timeline:  # methods evaluated at exactly the stopping time count too
            if r["time"] == stop:
                seen[r["method"]] = r
        assert summary["equal_time_budget_s"][str(seed)] == pytest.approx(stop)
        for m, r in seen.items():
            expected.setdefault(m, []).append(r["test_acc"])
    for m, s in summary["methods"].items():
        assert s["test_acc_at_equal_time"] == pytest.approx(sum(expected[m]) / 2)


def test_label_noise_equal_time_is_per_seed():
    """Hand-made records: seed 0's fastest method takes 2 s, seed 1's 6 s (one budget per seed)."""
    from robustclip.experiments.label_noise import summarize

    def arm(method, seed, times, accs):
        return [{"kind": "epoch", "method": method, "seed": seed, "epoch": e, "time": t, "test_acc": a,
                 "train_loss": 1.0, "train_acc": 0.5, "step_time": 0.1} for e, (t, a) in enumerate(zip(times, accs))]

    records = (arm("A", 0, [0, 1, 2], [0.1, 0.5, 0.3]) + arm("B", 0, [0, 2, 4], [0.1, 0.7, 0.9])
               + arm("A", 1, [0, 3, 6], [0.1, 0.6, 0.4]) + arm("B", 1, [0, 5, 10], [0.1, 0.6, 0.95]))
    s = summarize(records, ["A", "B"])
    assert s["equal_time_budget_s"] == {"0": 2, "1": 6}
    # A: its own final epochs (0.3, 0.4); B: epoch 1 on both seeds (0.7 at 2 s, 0.6 at 5 s)
    assert s["methods"]["A"]["test_acc_at_equal_time"] == pytest.approx(0.35)
    assert s["methods"]["B"]["test_acc_at_equal_time"] == pytest.approx(0.65)
    # the peak of the seed-averaged curve: A at epoch 1 (0.55), B at its end (0.925)
    assert (s["methods"]["A"]["peak_test_acc"], s["methods"]["A"]["peak_epoch"]) == (pytest.approx(0.55), 1)
    assert (s["methods"]["B"]["peak_test_acc"], s["methods"]["B"]["peak_epoch"]) == (pytest.approx(0.925), 2)
    # a budget below every epoch falls back to the epoch-0 evaluation
    late = arm("C", 0, [0, 9, 10], [0.2, 0.8, 0.9]) + arm("D", 0, [0, 1, 3], [0.1, 0.5, 0.6])
    assert summarize(late, ["C", "D"])["methods"]["C"]["test_acc_at_equal_time"] == 0.2


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


# -- method labels: one step against the formula ----------------------------------------------------


def _per_sample_grads(model, x, y):
    """g_i for every sample, one backward each (the oracle): a list of [weight grad, bias grad]."""
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum().backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return out


def _norm(g):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in g)).float()


def _avg(gs):
    return [torch.stack(parts).mean(0) for parts in zip(*gs)]


def _scale(g, c):
    return [t * min(1.0, float(c / _norm(g))) for t in g]


@pytest.mark.parametrize("label", [m for m in METHODS if m in available_methods()])
def test_method_labels_take_the_step_of_their_formula(label):
    """One SGD step (lr 1) of each label on a linear model, K = 2 micro-batches of 3 samples,
    against the label's formula computed from per-sample gradients."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    x[3:] *= 4.0  # the second micro-batch's gradients are much larger
    model = torch.nn.Linear(3, 2)
    w0 = [p.detach().clone() for p in model.parameters()]
    g = _per_sample_grads(model, x, y)
    mean = _avg(g)
    micro = [_avg(g[:3]), _avg(g[3:])]
    norms = sorted(float(_norm(gi)) for gi in g)
    # radii that make every clip bite somewhere but not everywhere
    c = {
        "Clip-SGD": 0.5 * float(_norm(mean)),
        "Clip-after-acc": 0.5 * float(_norm(mean)),
        "PS-Clip-SGD": (norms[2] + norms[3]) / 2,  # half the samples clipped
        "Micro-Clip": (float(_norm(micro[0])) + float(_norm(micro[1]))) / 2,  # one micro-batch clipped
    }.get(label, 1.0)
    s = torch.linalg.svdvals(mean[0])
    tau = float(s.mean())  # between the two singular values: the top one is clamped
    assert s[0] > tau > s[1]
    want = {
        "SGD": mean,
        "SGDM": mean,  # momentum's first step is the gradient itself
        "Clip-SGD": _scale(mean, c),
        "Clip-after-acc": _scale(mean, c),
        "NSGD": [t / _norm(mean) for t in mean],
        "PS-Clip-SGD": _avg([_scale(gi, c) for gi in g]),
        "Micro-Clip": _avg([_scale(gk, c) for gk in micro]),
    }
    if label == "Spectral":
        u, sv, vh = torch.linalg.svd(mean[0], full_matrices=False)
        want["Spectral"] = [u @ torch.diag(sv.clamp(max=tau)) @ vh, mean[1]]  # vectors untouched
    assert label in want, f"no oracle for the method label {label!r}; add its formula here"
    for name, other in (("Clip-after-acc", "Micro-Clip"), ("Clip-SGD", "PS-Clip-SGD")):
        if label == name:  # the radii bite: the two ways of clipping really differ here
            alt = want[other] if other == "PS-Clip-SGD" else _avg([_scale(gk, c) for gk in micro])
            assert not torch.allclose(want[name][0], alt[0], atol=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9 if label == "SGDM" else 0.0)
    method = build_method(label, MethodParams(clip=c, tau=tau, spectral_head=None))
    with rc.Clipper(model, opt, method) as clipper:
        for k in range(2):
            xb, yb = x[3 * k : 3 * k + 3], y[3 * k : 3 * k + 3]
            clipper.backward(((model(xb) - yb) ** 2).sum(1))
        clipper.step()
    got = [a - p.detach() for a, p in zip(w0, model.parameters())]  # lr 1: the step is the gradient
    for a, b in zip(got, want[label]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (label, a, b)


def test_rank1_noise_transform():
    from robustclip.experiments.spectral_mlp import Rank1HeavyTailedNoise

    params = [torch.zeros(6, 4), torch.zeros(4)]
    always = Rank1HeavyTailedNoise(p=1.0, alpha=1.1, scale=5.0, seed=0)
    state = always.init(params)
    grads = [torch.zeros(6, 4), torch.zeros(4)]
    grads, state = always.update(grads, state, None)
    assert torch.linalg.matrix_rank(grads[0]) == 1  # a rank-1 spike on the matrix
    # a vector is read as a (4, 1) matrix, as in the authors' code: its spike has norm |s| >= 5
    assert float(grads[1].norm()) >= 5.0
    assert float(state.spikes) == 1.0
    never = Rank1HeavyTailedNoise(p=0.0, alpha=1.1, scale=5.0, seed=0)
    g2, _ = never.update([torch.ones(6, 4)], never.init(params), None)
    assert torch.equal(g2[0], torch.ones(6, 4))


def _official_rank1_noise(shapes, p, alpha, scale, gen):
    """A transcription of the spike rule of the spectral-clipping authors' code (arXiv:2605.11838:
    noise.py's ``generate_lowrank_noise`` at rank 1, called for every parameter when
    ``rand < prob``), with the random numbers read from ``gen`` in the documented order.
    ``torch.distributions.Pareto(scale, alpha)`` samples ``scale * exp(E / alpha)`` with ``E``
    standard exponential; ``E = -log(U)`` for the uniform ``U``."""
    hit = float(torch.rand((), generator=gen)) < p
    out = []
    for shape in shapes:
        m = shape[0]
        n = math.prod(shape[1:]) if len(shape) > 1 else 1
        uni = 1.0 - float(torch.rand((), generator=gen, dtype=torch.float64))
        s = scale * math.exp(-math.log(uni) / alpha)
        s *= int(torch.randint(0, 2, (), generator=gen)) * 2 - 1
        u = torch.randn(m, generator=gen)
        v = torch.randn(n, generator=gen)
        noise = s * torch.outer(u / u.norm(), v / v.norm())
        out.append(noise.reshape(shape) if hit else torch.zeros(shape))
    return out, hit


def test_rank1_noise_matches_the_official_rule_on_a_fixed_sequence():
    from robustclip.experiments.spectral_mlp import Rank1HeavyTailedNoise

    shapes = [(7, 5), (5, 3, 2, 2), (3,), (1, 7)]
    noise = Rank1HeavyTailedNoise(p=0.3, alpha=1.1, scale=5.0, seed=11)
    state = noise.init([torch.zeros(s) for s in shapes])
    ref_gen = torch.Generator().manual_seed(11)
    hits = 0
    for _ in range(40):  # every step, the spikes and the no-spike steps alike
        base = [torch.randn(s) for s in shapes]
        got, state = noise.update([b.clone() for b in base], state, None)
        want, hit = _official_rank1_noise(shapes, 0.3, 1.1, 5.0, ref_gen)
        hits += hit
        assert float(state.spikes) == float(hit)
        for g, b, w in zip(got, base, want):
            torch.testing.assert_close(g - b, w, rtol=1e-5, atol=1e-4)
        if hit:
            # each matrix's spike is rank 1 with singular value |s| >= scale, of its own size
            sizes = [float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)) for w in want]
            assert min(sizes) >= 5.0 * (1 - 1e-5)
            assert len({round(z, 4) for z in sizes}) == len(sizes)
            assert float(state.size) == pytest.approx(max(sizes), rel=1e-5)
        else:
            assert float(state.size) == 0.0
    assert 5 <= hits <= 25  # the Bernoulli(0.3) draw is taken once per step


def test_rank1_noise_sizes_follow_the_official_pareto_law():
    """The sizes against ``torch.distributions.Pareto(5, 1.1)`` with a random sign (what the
    authors' code samples), two-sample Kolmogorov-Smirnov on fixed seeds."""
    from scipy.stats import ks_2samp

    from robustclip.experiments.spectral_mlp import Rank1HeavyTailedNoise

    noise = Rank1HeavyTailedNoise(p=1.0, alpha=1.1, scale=5.0, seed=3)
    shapes = [(4, 3)] * 50
    state = noise.init([torch.zeros(s) for s in shapes])
    ours = []
    for _ in range(40):
        got, state = noise.update([torch.zeros(s) for s in shapes], state, None)
        ours += [float(torch.linalg.matrix_norm(g, ord=2)) for g in got]
    torch.manual_seed(5)
    official = torch.distributions.Pareto(torch.tensor(5.0), torch.tensor(1.1)).sample((2000,))
    assert min(ours) >= 5.0 * (1 - 1e-5)
    assert ks_2samp(ours, official.tolist()).pvalue > 0.01
    # not the unnormalised or Lomax law it replaced: those put mass far below 5
    lomax = (5.0 * (torch.rand(2000, generator=torch.Generator().manual_seed(0)) ** (-1 / 1.1) - 1)).tolist()
    assert ks_2samp(ours, lomax).pvalue < 1e-6


def _rho_oracle(model, x, y):
    """rho_hat = mean_i ||g_i||^2 / ||mean_i g_i||^2 with per-sample gradients from torch.func."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    per_sample_sq = sum(v.flatten(1).double().pow(2).sum(1) for v in g.values())
    mean_sq = sum(v.double().mean(0).pow(2).sum() for v in g.values())
    return float(per_sample_sq.mean() / mean_sq)


def test_sgc_sweep_and_rho_every(tmp_path):
    from robustclip.experiments.data import load_digits
    from robustclip.experiments.models import MLP

    overrides = {**tiny("sgc"), "epochs": "4", "rho_every": "2"}
    out = run_experiment("sgc", overrides, out=tmp_path / "sgc", quiet=True)
    s = json.loads((out / "summary.json").read_text())
    # a step of 1000 on cross-entropy with plain SGD diverges or stalls: never "stable"
    assert s["sweep"]["SGD"]["1000"]["stable"] is False
    recs = _records(out)
    # the batch-size sweep: every method at every batch size, 4 steps each
    assert {m: sorted(v) for m, v in s["batch"].items()} == {m: ["16", "256"] for m in ("SGD", "Clip-SGD", "NSGD")}
    batch_arms = {r["arm"] for r in recs if r.get("part") == "batch"}
    assert len(batch_arms) == 6
    for a in batch_arms:  # a reading every max(1, steps // 10) steps
        assert [r["step"] for r in recs if r.get("arm") == a] == [0, 1, 2, 3, 4]
    # the bias probe at epochs 0, 2, 4 of each main run, at B = f * rho_hat of that epoch
    bias = [r for r in recs if r["kind"] == "bias"]
    assert sorted({(r["method"], r["epoch"]) for r in bias}) == sorted((m, e) for m in ("SGD", "Clip-SGD", "NSGD") for e in (0, 2, 4))
    for r in bias:
        assert r["batch"] == max(1, round(r["factor"] * r["rho_hat"]))
    assert len(s["bias"]) == len(bias)
    main = [r for r in recs if r.get("part") == "main" and r["kind"] == "epoch"]
    for m in ("SGD", "Clip-SGD", "NSGD"):
        # every epoch is logged, rho_hat only every rho_every = 2 epochs
        assert [r["epoch"] for r in main if r["method"] == m] == [0, 1, 2, 3, 4]
        assert [r["epoch"] for r in main if r["method"] == m and "rho_hat" in r] == [0, 2, 4]
    # rho_hat of the untrained model, against per-sample gradients computed independently
    split = load_digits(0.0, seed=0)
    torch.manual_seed(0)  # what the arm does before building its model
    model = MLP([64, 32, 10])
    want = _rho_oracle(model, split.x_train, split.y_train)
    for r in main:
        if r["epoch"] == 0:
            assert r["rho_hat"] == pytest.approx(want, rel=1e-4)


def _tiny_linear_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(9, 3)
    y = torch.randint(0, 3, (9,))
    return model, x, y


def test_sgc_direction_bias_against_a_loop_over_samples():
    """direction_bias on a fixed seed against its definition, with each mini-batch gradient
    built from per-sample gradients (batches of one) and the directions stacked."""
    from robustclip.experiments.sgc import direction_bias

    model, x, y = _tiny_linear_problem()
    params = list(model.parameters())

    def grad_of(xs, ys):
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xs), ys), params)
        return torch.cat([t.reshape(-1) for t in g]).double()

    per_sample = torch.stack([grad_of(x[i : i + 1], y[i : i + 1]) for i in range(9)])
    full = per_sample.mean(0)
    c, draws = 0.3, 7
    got = direction_bias(model, x, y, [2, 5], c, draws, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)  # the same draws, in the same order
    for b in (2, 5):
        batch = torch.stack([per_sample[torch.randint(0, 9, (b,), generator=gen)].mean(0) for _ in range(draws)])
        norms = batch.norm(dim=1, keepdim=True)
        dirs = {"SGD": batch, "Clip-SGD": batch * (c / norms).clamp(max=1.0), "NSGD": batch / norms}
        refs = {"SGD": full, "Clip-SGD": full * min(1.0, c / float(full.norm())), "NSGD": full / full.norm()}
        for m, d in dirs.items():
            var = d.var(dim=0, unbiased=True).sum()
            bias_sq = (d.mean(0) - refs[m]).pow(2).sum() - var / draws
            want = math.sqrt(max(float(bias_sq), 0.0)) / float(refs[m].norm())
            assert got[b][m] == pytest.approx(want, rel=1e-6, abs=1e-9), (b, m)
            turn = d.mean(0) @ refs[m] / (d.mean(0).norm() * refs[m].norm())
            assert got[b][f"{m} cos"] == pytest.approx(float(turn), rel=1e-6), (b, m)
        cos = (batch @ full / (norms.squeeze(1) * full.norm())).mean()
        assert got[b]["cos"] == pytest.approx(float(cos), rel=1e-6)


def test_sgc_direction_bias_shrinks_with_the_batch():
    """SGD's mini-batch mean is unbiased (the estimate is ~0); NSGD's direction is biased at a
    batch of one and much less at a batch far above rho (fixed seeds)."""
    from robustclip.diagnostics import estimate_strong_growth
    from robustclip.experiments.sgc import direction_bias

    model, x, y = _tiny_linear_problem()
    rho = estimate_strong_growth(model, lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none"), x, y).rho
    big = int(20 * rho) + 1
    got = direction_bias(model, x, y, [1, big], 1e-3, 400, torch.Generator().manual_seed(1))
    assert got[1]["NSGD"] > 0.2
    assert got[big]["NSGD"] < 0.25 * got[1]["NSGD"]
    assert got[big]["SGD"] < 0.05 and got[big]["cos"] > got[1]["cos"]


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def _assert_same_final_weights(a: Path, b: Path) -> None:
    """Every finished arm of run ``a`` has exactly the final model weights of run ``b``'s."""
    done = torch.load(a / "checkpoint.pt", weights_only=True)["done"]
    assert done == torch.load(b / "checkpoint.pt", weights_only=True)["done"] and done
    for arm in done:
        wa, wb = load_final_state(a, arm)["model"], load_final_state(b, arm)["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), arm


@pytest.mark.parametrize(
    ("name", "overrides", "every", "stop"),
    [
        # stop mid-epoch of the second arm (PS-Clip-SGD: clipper and per-sample state)
        ("label-noise", {"methods": "SGDM,PS-Clip-SGD", "epochs": "3", "seeds": "1", "hidden": "16", "batch_size": "64"}, 5, 31),
        ("synthetic-noise", {"seeds": "2", "steps": "12", "regimes": "student:1.5", "methods": "Clip-SGD,PS-Clip-SGD"}, 4, 30),
        ("spectral-mlp", {"n_train": "256", "n_test": "64", "width": "8", "depth": "2", "epochs": "2", "eval_every": "3", "arms": "Clip-SGD,Spectral-Q85"}, 4, 23),
        ("accumulation", None, 2, 5),
        # 42 steps per digits epoch, 3 epochs per arm: mid second arm
        ("demo", {"scale": "0.1", "seeds": "1", "methods": "SGDM,PS-Clip-SGD", "problems": "digits"}, 10, 150),
        # mid second main arm: rho_hat records (every 2 epochs) and the sweep still to come
        ("sgc", {"hidden": "32", "epochs": "3", "sweep_lrs": "0.1,1000", "sweep_epochs": "1", "batch_size": "128", "rho_every": "2",
                 "bias_every": "2", "bias_draws": "2", "batch_sizes": "16,256", "batch_lrs": "1", "batch_steps": "4"}, 4, 37),
        # 30 steps per main arm (10 per epoch), 10 per sweep arm, 4 per batch arm: mid the batch part
        ("sgc", {"hidden": "16", "epochs": "3", "sweep_lrs": "0.1", "sweep_epochs": "1", "batch_size": "128", "rho_every": "2",
                 "bias_every": "2", "bias_draws": "2", "batch_sizes": "16,256", "batch_lrs": "0.5,1", "batch_steps": "4"}, 2, 131),
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
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert ck["arm"] is not None and len(_records(part)) >= ck["metrics_lines"]
    run_experiment(name, overrides, out=part, quiet=True, checkpoint_every=every, resume=True)
    assert _strip(_records(part)) == _strip(_records(full))
    _assert_same_final_weights(full, part)
    assert json.loads((part / "summary.json").read_text()).keys() == json.loads((full / "summary.json").read_text()).keys()
    # finished arms keep their state in final/, not in every checkpoint
    assert torch.load(part / "checkpoint.pt", weights_only=True).keys() == {"experiment", "config", "done", "metrics_lines", "arm"}


def test_resume_before_the_first_checkpoint(tmp_path):
    """Killed before any arm checkpoint (and before the first arm ended): resume restarts it."""
    overrides = {"methods": "SGDM,PS-Clip-SGD", "epochs": "2", "seeds": "1", "hidden": "16", "batch_size": "64"}
    full = run_experiment("label-noise", overrides, out=tmp_path / "full", quiet=True)
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        run_experiment("label-noise", overrides, out=part, quiet=True, checkpoint_every=1000, interrupt_after=5)
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert ck["arm"] is None and ck["done"] == [] and ck["metrics_lines"] == 0
    assert _records(part)  # the epoch-0 record of the first arm, to be dropped
    # starting afresh is refused (the run is there), resuming works
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        run_experiment("label-noise", overrides, out=part, quiet=True)
    run_experiment("label-noise", overrides, out=part, quiet=True, resume=True)
    assert _strip(_records(part)) == _strip(_records(full))
    _assert_same_final_weights(full, part)


def test_resume_after_an_error_inside_the_run(tmp_path, monkeypatch):
    from robustclip.experiments import label_noise

    overrides = {"methods": "SGDM", "epochs": "1", "seeds": "1", "hidden": "16", "batch_size": "64"}
    real = label_noise.load_digits

    def broken(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr(label_noise, "load_digits", broken)
    with pytest.raises(OSError, match="disk went away"):
        run_experiment("label-noise", overrides, out=tmp_path / "r", quiet=True)
    monkeypatch.setattr(label_noise, "load_digits", real)
    run_experiment("label-noise", overrides, out=tmp_path / "r", quiet=True, resume=True)
    clean = run_experiment("label-noise", overrides, out=tmp_path / "clean", quiet=True)
    assert _strip(_records(tmp_path / "r")) == _strip(_records(clean))


def test_machine_and_config_checks_come_before_the_run_directory(tmp_path, cifar_dir):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            run_experiment("label-noise", {"device": "cuda"}, out=tmp_path / "gpu", quiet=True)
        assert not (tmp_path / "gpu").exists()
    with pytest.raises(ValueError, match="norm=batch cannot train .*PS-Clip-SGD"):
        make_config("cifar10-resnet18", {"data_dir": cifar_dir, "norm": "batch", "methods": "SGD,PS-Clip-SGD"})
    assert make_config("cifar10-resnet18", {"norm": "batch"}).norm == "batch"  # SGD, Clip-SGD, NSGD: fine
    with pytest.raises(ValueError, match="dataset must be 'cifar10' or 'cifar100'"):
        make_config("cifar100-alexnet", {"dataset": "mnist"})
    # each CIFAR experiment picks its data set by name; the field can change it deliberately
    assert [make_config(n).dataset for n in ("cifar100-alexnet", "cifar10-resnet18", "cifar10-spectral")] == ["cifar100", "cifar10", "cifar10"]


def test_nsgd_step_size_convention():
    from robustclip.experiments._methods import step_size

    assert step_size("Clip-SGD", 0.1, 3.0) == 0.1
    assert step_size("NSGD", 0.1, 3.0) == pytest.approx(0.3)  # 0: lr * clip
    assert step_size("NSGD", 0.1, 3.0, nsgd_lr=0.5) == 0.5
    # both experiments with an NSGD step size use the same convention, and default to it
    assert make_config("synthetic-noise").nsgd_lr == 0.0 and make_config("cifar10-resnet18").nsgd_lr == 0.0


def test_resume_after_a_real_kill(tmp_path):
    """SIGKILL a ``robustclip run`` process mid-arm, resume it, and compare with a clean run.

    The process kills itself after a fixed number of steps (``--kill-after``, a testing aid), so
    the kill always lands between two checkpoints, whatever the machine's speed.
    """
    overrides = {"methods": "SGDM,PS-Clip-SGD", "epochs": "2", "seeds": "1", "hidden": "16", "batch_size": "64"}
    out = tmp_path / "killed"
    # 21 steps per epoch, 42 per arm: the kill lands at step 13 of the second arm, after its
    # checkpoint at step 10, with metric lines written since
    cmd = [sys.executable, "-m", "robustclip", "run", "label-noise", "--out", str(out), "--no-progress",
           "--threads", "1", "--checkpoint-every", "10", "--kill-after", "55"]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["done"] == ["SGDM/seed0"] and ck["arm"]["id"] == "PS-Clip-SGD/seed0" and ck["arm"]["step"] == 10
    assert not (out / "summary.json").exists()
    run_experiment("label-noise", overrides, out=out, resume=True, quiet=True)
    clean = run_experiment("label-noise", overrides, out=tmp_path / "clean", quiet=True)
    assert _strip(_records(out)) == _strip(_records(clean))
    _assert_same_final_weights(out, clean)


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
    from robustclip.experiments.models import AlexNet, ResNet18

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
    from robustclip.experiments.models import ResNet18

    bn = ResNet18(10, norm="batch", width=4)
    with pytest.raises(ValueError, match="BatchNorm"):
        rc.Clipper(bn, torch.optim.SGD(bn.parameters(), lr=0.1), rc.per_sample_clip(1.0)).backward(
            bn(torch.randn(2, 3, 32, 32)).sum(1)
        )
    gn = rc.convert_batchnorm_to_groupnorm(ResNet18(10, norm="batch", width=4))
    ref = ResNet18(10, norm="group", width=4)
    assert [(n, p.shape) for n, p in gn.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert ResNet18(10, width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# -- the package's shape ----------------------------------------------------------------------------


def test_experiment_modules_import_no_circle():
    """The modules of ``robustclip.experiments`` import each other without a circle (imports
    inside functions count too; the registry's by-name ``importlib`` loads do not)."""
    import ast

    import robustclip.experiments as pkg

    root = Path(pkg.__file__).parent
    names = {p.stem for p in root.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = edges.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "robustclip.experiments":
                deps |= {a.name for a in node.names if a.name in names} | {"__init__"}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustclip.experiments."):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("robustclip.experiments.")}
        deps.discard(path.stem)
    assert edges["_runner"] and "demo" not in edges["_runner"]  # the graph was read

    def visit(m: str, stack: list[str]) -> None:
        assert m not in stack, f"import circle: {' -> '.join([*stack[stack.index(m):], m])}"
        for d in sorted(edges.get(m, ())):
            visit(d, [*stack, m])

    for m in edges:
        visit(m, [])


def test_demo_is_registered_like_the_others():
    from robustclip.experiments import demo, describe, get_experiment

    assert "demo" in list_experiments() and get_experiment("demo") is demo
    assert "PS-Clip-SGD" in describe("demo")
    assert make_config("demo", {"seeds": "2"}).seeds == 2


@pytest.mark.parametrize("method", ["SGDM", "Clip-SGD", "Spectral"])
def test_cifar10_spectral_follows_the_papers_loss_scale_and_selection(method, cifar_dir):
    """One step of each cifar10-spectral arm against a transcription of the authors' airbench
    loop (arXiv:2605.11838): ``cross_entropy(..., reduction="sum").backward()``, then norm
    clipping (``clip_grad_norm_``) or exact spectral clipping of the 4-D filters only."""
    import copy

    import torch.nn.functional as F

    from robustclip.experiments import cifar
    from robustclip.experiments.data import normalize_images

    cfg = cifar.default_config("cifar10-spectral")
    assert (cfg.batch_size, cfg.loss_reduction, cfg.clip_params, cfg.tau, cfg.rank, cfg.clip) == (2000, "sum", "conv", 1.0, 10, 1.0)
    assert cfg.lr * cfg.batch_size == pytest.approx(0.1)  # an unclipped step equals a mean-loss step of 0.1
    cfg.data_dir, cfg.width, cfg.batch_size, cfg.rank = cifar_dir, 4, 16, 0  # rank 0: the exact SVD, as transcribed
    split = cifar.load(cfg)
    x, y = normalize_images(split.x_train[:16]), split.y_train[:16]
    torch.manual_seed(0)
    model = cifar.build_model(cfg, split.num_classes)
    ref = copy.deepcopy(model)

    F.cross_entropy(ref(x), y, reduction="sum").backward()
    filters = [p for p in ref.parameters() if p.dim() == 4]
    if method == "Clip-SGD":
        torch.nn.utils.clip_grad_norm_(filters, cfg.clip)
    elif method == "Spectral":
        for p in filters:
            u, s, vh = torch.linalg.svd(p.grad.reshape(p.shape[0], -1).double(), full_matrices=False)
            p.grad = ((u * s.clamp(max=cfg.tau)) @ vh).reshape(p.shape).float()
    want = [p.grad.clone() for p in ref.parameters()]

    w0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is the gradient
    with rc.Clipper(model, opt, cifar.build_arm_method(cfg, method)) as clipper:
        clipper.backward(cifar._loss(model(x), y))
        info = clipper.step()
    got = [a - p.detach() for a, p in zip(w0, model.parameters())]
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        scale = float(b.abs().max()) + 1e-6
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=f"{method}: {name}")
    if method == "Spectral":
        sigma = info.transforms["spectral_clip"]["sigma_before"]
        conv = torch.tensor([p.dim() == 4 for p in model.parameters()])
        assert torch.isfinite(sigma[conv]).all() and torch.isnan(sigma[~conv]).all()
        # the summed gradient is far above tau: the paper's tau = 1 clips every filter
        assert float(info.transforms["spectral_clip"]["clipped_fraction"]) == 1.0
    if method == "Clip-SGD":
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in want if g.dim() == 4]))
        assert float(norm) == pytest.approx(cfg.clip, rel=1e-4)


def test_cifar_clip_params_conv_refuses_sample_level_methods():
    from robustclip.experiments import cifar

    cfg = cifar.default_config("cifar10-spectral")
    cfg.methods = ("SGDM", "PS-Clip-SGD")
    with pytest.raises(ValueError, match="clip_params=conv"):
        cfg.check()
    cfg.clip_params, cfg.loss_reduction = "all", "mean"
    cfg.check()
    cfg.loss_reduction = "median"
    with pytest.raises(ValueError, match="loss_reduction"):
        cfg.check()
