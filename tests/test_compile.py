"""torch.compile(model) with robustclip: the same parameters as eager, one method per path
(mean's backward, micro-batch clipping's autograd.grad, the per-sample hook engine, a spectral
transform), and a clear error where the engine's hooks were attached after compilation.

The compiler backend is ``aot_eager``: dynamo's graph capture (with the hook engine's graph
breaks) and AOTAutograd's joint forward and backward, as in the default backend, without
inductor's code generation, which takes minutes on a small CI machine. Inductor itself is timed
in ``benchmarks/run.py --suite compile``.
"""

from __future__ import annotations

import pytest
import torch

import robustclip as rc
from robustclip.experiments.models import CharGPT, sequence_losses

# Dynamo reads .grad of the layer outputs it receives after each of the hook engine's graph
# breaks (non-leaf tensors); PyTorch's warning about that is not shown outside warnings-as-errors
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")

BACKEND = "aot_eager"
STEPS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> CharGPT:
    torch.manual_seed(0)
    return CharGPT(vocab=11, block_size=8, d=16, layers=2, heads=2)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (STEPS, 8, 8), generator=g), torch.randint(0, 11, (STEPS, 8, 8), generator=g)


def _train(method, compiled: bool) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    # the Clipper first: its hooks must be on the model before the compiled forward first runs
    clipper = rc.Clipper(model, opt, method)
    forward = torch.compile(model, backend=BACKEND) if compiled else model
    xs, ys = _data()
    with clipper:
        for s in range(STEPS):
            for x, y in zip(xs[s].chunk(2), ys[s].chunk(2)):
                clipper.backward(sequence_losses(forward(x), y))
            clipper.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "make",
    [
        lambda: rc.chain(rc.mean(), rc.spectral_clip(0.01, rank=None)),
        lambda: rc.micro_batch_clip(0.05),
        lambda: rc.chain(rc.per_sample_clip(0.05), rc.clip_by_global_norm(0.1)),
    ],
    ids=["mean+spectral", "micro_batch", "per_sample_hooks"],
)
def test_compiled_model_matches_eager(make):
    eager = _train(make(), compiled=False)
    compiled = _train(make(), compiled=True)
    start = [p.detach() for p in _model().parameters()]
    assert max(float((a - b).norm()) for a, b in zip(eager, start)) > 1e-3  # the steps moved
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(compiled, eager))
    assert err < 1e-5, err  # float32 rounding, reordered by the compiler


@pytest.mark.parametrize("other_instance", [False, True], ids=["same_model", "another_instance"])
def test_hooks_attached_after_compiling_raise(other_instance):
    """Dynamo does not re-check module hooks: a model compiled and run before the Clipper
    attached its hooks never fires them. The engine says so instead of falling back."""
    x, y = (t[0, :4] for t in _data())
    first = _model()
    torch.compile(first, backend=BACKEND)(x)
    model = _model() if other_instance else first
    forward = torch.compile(model, backend=BACKEND) if other_instance else torch.compile(first, backend=BACKEND)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(0.05))
    with clipper, pytest.raises(RuntimeError, match="compiled with torch.compile before the Clipper"):
        clipper.backward(sequence_losses(forward(x), y))


def test_clipper_given_the_compiled_module_uses_the_eager_names():
    model = _model()
    compiled = torch.compile(model, backend=BACKEND)
    with rc.Clipper(compiled, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(0.05)) as clipper:
        assert clipper.layout.names == [n for n, _ in model.named_parameters()]
        x, y = (t[0, :4] for t in _data())
        clipper.backward(sequence_losses(compiled(x), y))
        assert not clipper.step().skipped
