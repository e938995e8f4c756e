"""Bad input gets a clear error; non-finite steps are skipped without touching anything."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip.experiments.models import MLP

from . import _oracles as O


def mlp_case(batch=4):
    model = MLP([5, 8, 3])
    x, y = torch.randn(batch, 5), torch.randint(0, 3, (batch,))
    return model, x, y


def test_scalar_loss_with_per_sample_method():
    model, x, y = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0))
    with pytest.raises(ValueError, match="reduction='none'"):
        clipper.backward(F.cross_entropy(model(x), y))


def test_scalar_loss_is_fine_for_batch_methods():
    model, x, y = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.clip_by_global_norm(1.0))
    clipper.backward(F.cross_entropy(model(x), y))
    assert not clipper.step().skipped


def test_per_token_losses_need_reducing():
    model, x, y = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0))
    with pytest.raises(ValueError, match=r"1-D tensor of per-sample losses"):
        clipper.backward(O.ce(model(x), y).unsqueeze(1).expand(4, 3))


@pytest.mark.parametrize(
    "bad,exc,msg",
    [
        (0.0, ValueError, "must be > 0"),
        (-1.0, ValueError, "must be > 0"),
        (math.nan, ValueError, "NaN"),
        (math.inf, ValueError, "max_norm=None"),
        ("1.0", TypeError, "positive number"),
        (True, TypeError, "positive number"),
    ],
)
@pytest.mark.parametrize(
    "factory",
    [rc.per_sample_clip, rc.micro_batch_clip, rc.clip_by_global_norm, rc.clip_by_tensor_norm],
)
def test_bad_radius(factory, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        factory(bad)


def test_empty_batch():
    model, x, y = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0))
    with pytest.raises(ValueError, match="empty"):
        clipper.backward(O.ce(model(x[:0]), y[:0]))


def test_parameters_without_gradient():
    model = nn.ModuleDict({"used": nn.Linear(5, 3), "unused": nn.Linear(5, 3)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = rc.Clipper(model, opt, rc.per_sample_clip(1.0))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"unused\.weight.*requires_grad_\(False\)"):
        clipper.backward(O.ce(model["used"](x), y))
    # the advertised fix works: zero gradient for the unused layer
    clipper = rc.Clipper(model, opt, rc.clip_by_global_norm(1.0), allow_unused=True)
    clipper.backward(O.ce(model["used"](x), y))
    clipper.step()
    assert torch.count_nonzero(model["unused"].weight.grad) == 0


def test_batchnorm_error_and_conversion():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="normalizes each sample with statistics of the whole batch"):
        rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0))
    # switched to training mode after the clipper was built: caught at backward()
    model.eval()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0, engine="vmap"))
    model.train()
    with pytest.raises(ValueError, match="convert_batchnorm_to_groupnorm"):
        clipper.backward(O.ce(model(x), y))
    clipper.close()
    # BatchNorm is fine for batch-level methods
    rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.clip_by_global_norm(1.0)).backward(
        O.ce(model(x), y)
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    learned = (model[1].weight.clone(), model[1].bias.clone())
    model = rc.convert_batchnorm_to_groupnorm(model)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_channels == 6
    assert torch.equal(model[1].weight, learned[0]) and torch.equal(model[1].bias, learned[1])
    assert model[1].num_groups == 2  # gcd(32, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = rc.Clipper(model, opt, rc.per_sample_clip(1.0, engine="vmap"))
    clipper.backward(O.ce(model(x), y))
    assert not clipper.step().skipped


def test_vmap_detects_samples_that_interact():
    class BatchCentre(nn.Module):  # mixes samples like BatchNorm, but is not a BatchNorm
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0, keepdim=True)

    model = BatchCentre()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0, engine="vmap"))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="samples interact"):
        clipper.backward(O.ce(model(x), y))


def test_vmap_refuses_dropout_but_loop_handles_it():
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0, engine="vmap"))
    with pytest.raises(ValueError, match="dropout"):
        clipper.backward(O.ce(model(x), y))
    clipper.close()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0, engine="loop"))
    clipper.backward(O.ce(model(x), y))
    assert not clipper.step().skipped


def test_weight_penalty_inside_per_sample_loss_is_refused():
    model, x, y = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0, engine="vmap"))
    penalty = sum(p.pow(2).sum() for p in model.parameters())
    with pytest.raises(ValueError, match="weight_decay"):
        clipper.backward(O.ce(model(x), y) + 1e-3 * penalty)


def test_other_bad_inputs():
    model, x, y = mlp_case()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        rc.Clipper(model, "sgd", rc.mean())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="as its method"):
        rc.Clipper(model, opt, "clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown per-sample engine"):
        rc.per_sample_clip(1.0, engine="fast")
    with pytest.raises(ValueError, match="must come first"):
        rc.chain(rc.clip_by_global_norm(1.0), rc.per_sample_clip(1.0))
    with pytest.raises(ValueError, match="more than one"):
        rc.chain(rc.per_sample_clip(1.0), rc.micro_batch_clip(1.0))
    with pytest.raises(ValueError, match="per_layer=True"):
        rc.per_sample_clip({"0": 1.0})
    with pytest.raises(ValueError, match=r"Missing: \['2'\]"):
        rc.Clipper(model, opt, rc.per_sample_clip({"0": 1.0}, per_layer=True))
    clipper = rc.Clipper(model, opt, rc.mean())
    with pytest.raises(RuntimeError, match="before any backward"):
        clipper.step()
    with pytest.raises(ValueError, match="do not require grad"):
        with torch.no_grad():
            clipper.backward(O.ce(model(x), y))
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not part of the model"):
        rc.Clipper(model, torch.optim.SGD(other.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "method",
    [rc.mean(), rc.clip_by_global_norm(1.0), rc.per_sample_clip(1.0, engine="vmap"), rc.micro_batch_clip(1.0)],
    ids=["mean", "clip", "per_sample", "micro_batch"],
)
@pytest.mark.parametrize("poison", ["nan_input", "inf_loss", "constant_neg_inf_loss"])
def test_nonfinite_step_is_skipped(method, poison, caplog):
    model, x, y = mlp_case()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    clipper = rc.Clipper(model, opt, method)
    clipper.backward(O.ce(model(x), y))  # one good step so the optimizer has state
    clipper.step()
    weights = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    if poison == "nan_input":
        x = x.clone()
        x[1, 2] = math.nan
        losses = O.ce(model(x), y)
    elif poison == "inf_loss":
        losses = O.ce(model(x), y) * torch.tensor([1.0, math.inf, 1.0, 1.0])
    else:  # a finite gradient, but the loss is -inf: still skipped
        losses = O.ce(model(x), y) + torch.tensor([0.0, -math.inf, 0.0, 0.0])
    clipper.backward(losses)
    info = clipper.step()
    assert info.skipped and clipper.skipped_steps == 1
    assert "skipped" in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    after = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][pid][k], v)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the next good step goes through
    clipper.backward(O.ce(model(torch.randn(4, 5)), y))
    assert not clipper.step().skipped


@pytest.mark.parametrize(
    "method",
    [
        rc.per_sample_clip(1.0, engine="vmap"),
        rc.per_sample_clip(1.0, engine="loop"),
        rc.per_sample_clip(1.0, per_layer=True, engine="vmap"),
        rc.per_sample_normalize(0.0, engine="vmap"),
        rc.micro_batch_clip(1.0),
        rc.chain(rc.mean(), rc.normalize()),
        rc.clip_by_tensor_norm(1.0),
    ],
)
def test_zero_gradients_give_no_nan(method):
    """Every sample already fitted: zero per-sample gradients, zero update, no NaN."""
    model = nn.Linear(4, 1)
    x = torch.randn(6, 4)
    with torch.no_grad():
        y = model(x).squeeze(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = rc.Clipper(model, opt, method)
    before = [p.detach().clone() for p in model.parameters()]
    clipper.backward((model(x).squeeze(1) - y).pow(2))
    info = clipper.step()
    assert not info.skipped
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert torch.isfinite(p.grad).all()
