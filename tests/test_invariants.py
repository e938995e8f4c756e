"""Properties that hold for any input: no clipping = mean, bounded influence, chunking, state."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import robustclip as rc
from robustclip.experiments.models import MLP
from robustclip.per_sample import ENGINES

from . import _oracles as O


def grad_of(method, model, x, y, loss_fn=O.ce, micro=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with rc.Clipper(model, opt, method) as clipper:
        for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
            clipper.backward(loss_fn(model(xb), yb))
        clipper.step()
        return [p.grad.clone() for p in clipper.params]


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("radius", [None, 1e30])
def test_no_clipping_gives_the_mean_gradient(engine, radius):
    model, x, y, loss_fn = O.make_case("gpt", torch.float64)
    params = O.trainable(model)
    ref = O.mean_grad(model, loss_fn, x, y, params)
    got = grad_of(rc.per_sample_clip(radius, engine=engine), model, x, y, loss_fn)
    assert O.max_rel_err(got, ref) <= 1e-12
    got = grad_of(rc.per_sample_clip(radius, per_layer=True, engine=engine), model, x, y, loss_fn)
    assert O.max_rel_err(got, ref) <= 1e-12
    if radius is not None:
        got = grad_of(rc.micro_batch_clip(radius), model, x, y, loss_fn, micro=3)
        assert O.max_rel_err(got, ref) <= 1e-12
        got = grad_of(rc.clip_by_global_norm(radius), model, x, y, loss_fn)
        assert O.max_rel_err(got, ref) <= 1e-12


@settings(max_examples=15, deadline=None)
@given(
    c=st.floats(0.01, 5.0),
    batch=st.integers(1, 7),
    outlier=st.floats(1.0, 1e4),
    seed=st.integers(0, 2**16),
)
def test_one_sample_moves_the_update_by_at_most_2c_over_B(c, batch, outlier, seed):
    """After per-sample clipping no sample contributes more than c: replacing one sample by
    an arbitrarily bad one moves the mean by at most 2c/B, and the mean has norm <= c."""
    torch.manual_seed(seed)
    model = MLP([6, 10, 3]).double()
    x = torch.randn(batch, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    g1 = grad_of(rc.per_sample_clip(c, engine="vmap"), model, x, y)
    x2 = x.clone()
    x2[0] *= outlier
    g2 = grad_of(rc.per_sample_clip(c, engine="vmap"), model, x2, y)
    assert O.flat_norm(g1) <= c * (1 + 1e-9)
    assert O.flat_norm(g2) <= c * (1 + 1e-9)
    assert O.flat_norm([a - b for a, b in zip(g1, g2)]) <= 2 * c / batch * (1 + 1e-9)


@pytest.mark.parametrize("chunk_elements", [1, 500, 10**9])
def test_result_does_not_depend_on_the_chunk_size(chunk_elements):
    model, x, y, loss_fn = O.make_case("cnn", torch.float64, batch=7)
    ref = grad_of(rc.per_sample_clip(0.2, engine="loop"), model, x, y, loss_fn)
    got = grad_of(rc.per_sample_clip(0.2, engine="vmap", max_chunk_elements=chunk_elements), model, x, y, loss_fn)
    assert O.max_rel_err(got, ref) <= 1e-12


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _state_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize(
    "method",
    [
        rc.chain(rc.per_sample_clip(0.5, engine="vmap"), rc.clip_by_global_norm(0.3), rc.clip_by_tensor_norm(0.2)),
        rc.chain(rc.micro_batch_clip(0.5), rc.normalize()),
        rc.chain(rc.mean(), rc.l0l1_warmup(1.0, 2.0)),
        rc.per_sample_clip(0.5, per_layer=True, engine="vmap"),
    ],
)
def test_state_dict_round_trips_and_resumes(method):
    model, x, y, loss_fn = O.make_case("mlp", torch.float64)
    twin, *_ = O.make_case("mlp", torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    clipper = rc.Clipper(model, opt, method)
    for _ in range(2):
        clipper.backward(loss_fn(model(x), y))
        clipper.step()
    saved = _roundtrip({"clip": clipper.state_dict(), "opt": opt.state_dict(), "model": model.state_dict()})
    twin.load_state_dict(saved["model"])
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_opt.load_state_dict(saved["opt"])
    twin_clipper = rc.Clipper(twin, twin_opt, method)
    twin_clipper.load_state_dict(saved["clip"])
    assert _state_equal(twin_clipper.state_dict(), clipper.state_dict())
    assert twin_clipper.steps == 2
    for m, c in ((model, clipper), (twin, twin_clipper)):
        c.backward(loss_fn(m(x), y))
        c.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_a_different_method():
    model, x, y, loss_fn = O.make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = rc.Clipper(model, opt, rc.chain(rc.mean(), rc.clip_by_global_norm(1.0))).state_dict()
    other = rc.Clipper(model, opt, rc.chain(rc.mean(), rc.clip_by_global_norm(1.0), rc.normalize()))
    with pytest.raises(ValueError, match="chain has 2 transforms"):
        other.load_state_dict(state)


def test_step_info_holds_device_tensors_until_as_dict():
    model, x, y, loss_fn = O.make_case("mlp")
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(0.1, engine="vmap"))
    clipper.backward(loss_fn(model(x), y))
    info = clipper.step()
    assert isinstance(info.grad_norm, torch.Tensor) and isinstance(info.per_sample_norms, torch.Tensor)
    d = info.as_dict()
    assert d["num_samples"] == x.shape[0] and len(d["per_sample_norms"]) == x.shape[0]
    assert 0.0 <= d["clipped_fraction"] <= 1.0 and isinstance(d["loss"], float)
