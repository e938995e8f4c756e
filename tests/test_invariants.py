"""Properties that hold for any input: no clipping = mean, bounded influence, chunking, state;
and one of the code itself: the core modules import each other without a circle."""

from __future__ import annotations

import ast
import io
from pathlib import Path

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


SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_import_graph() -> dict[str, set[str]]:
    """module -> the core modules it imports anywhere in its text (lazy imports inside
    functions included), for ``src/robustclip/*.py`` and ``src/robustclip/per_sample/``.

    A package's ``__init__`` importing its own submodules (its table of contents, or a registry
    loading its entries) is left out: those submodules may import what the package defines
    first, as the layer rules do with ``register``."""
    root = SRC / "robustclip"
    files = sorted(root.glob("*.py")) + sorted((root / "per_sample").rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import sub` imports the submodule where there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            own = name + "." if path.name == "__init__.py" else None
            deps.update(t for t in targets if t in modules and t != name and not (own and t.startswith(own)))
        graph[name] = deps
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import circle of ``graph`` (``[a, b, ..., a]``), or None: a depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_core_modules_import_without_a_circle():
    graph = core_import_graph()
    # the rooms of the layout are there, with the imports it promises
    assert {"robustclip._method", "robustclip._estimators", "robustclip._math", "robustclip._svd"} <= set(graph)
    assert "robustclip._method" not in graph["robustclip._estimators"] | graph["robustclip._transform"]
    assert "robustclip._math" in graph["robustclip._estimators"] & graph["robustclip._spectral"]
    assert "robustclip.per_sample._grads" in graph["robustclip.per_sample._engine"]
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_import_graph_sees_a_circle(tmp_path, monkeypatch):
    """The graph is built from the source text: a lazy import inside a function counts."""
    pkg = tmp_path / "robustclip"
    (pkg / "per_sample").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from robustclip import a\n")
    (pkg / "per_sample" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from robustclip import b\n")
    (pkg / "b.py").write_text("def f():\n    from robustclip.a import x\n")
    (pkg / "c.py").write_text("import robustclip.a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", tmp_path)
    graph = core_import_graph()
    assert graph["robustclip.a"] == {"robustclip.b"} and graph["robustclip.b"] == {"robustclip.a"}
    assert graph["robustclip.c"] == {"robustclip.a"} and graph["robustclip"] == set()
    assert find_circle(graph) == ["robustclip.a", "robustclip.b", "robustclip.a"]
    assert find_circle({"x": {"y"}, "y": set()}) is None
