"""Spectral clipping against the full-SVD oracle (float64 ``torch.linalg.svd``)."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip import thresholds as th
from robustclip._spectral import spectral_clip
from robustclip._svd import clip_singular_values
from robustclip._transform import StepContext
from robustclip.experiments.models import MLP, CharGPT, SmallCNN, sequence_losses


def oracle_clip(g: torch.Tensor, tau: float) -> torch.Tensor:
    """U min(S, tau) V^T of the (shape[0], -1) matrix, in float64."""
    m = g.double().reshape(g.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return ((u * s.clamp(max=tau)) @ vh).reshape(g.shape)


def oracle_topr(g: torch.Tensor, tau: float, r: int) -> torch.Tensor:
    """G + U_r diag(min(S_r, tau) - S_r) V_r^T with the exact top-r triplets, in float64."""
    m = g.double().reshape(g.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    d = s[:r].clamp(max=tau) - s[:r]
    return (m + (u[:, :r] * d) @ vh[:r]).reshape(g.shape)


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def sigma1(g: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(g.double().reshape(g.shape[0], -1), ord=2))


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float()


def apply(transform, grads, names=None, modules=None, state=None):
    """Run a transform once on copies of ``grads`` outside a Clipper."""
    grads = [g.clone() for g in grads]
    params = [torch.zeros_like(g) for g in grads]
    names = names or [f"p{i}" for i in range(len(grads))]
    state = transform.init(params) if state is None else state
    ctx = StepContext(params, names, modules=modules or [None] * len(grads))
    out, state = transform.update(grads, state, ctx)
    return out, state


MODES = [pytest.param(None, id="exact"), pytest.param(4, id="randomized")]
SHAPES = [(40, 30), (30, 40), (48, 48)]


@pytest.fixture
def rank(request):
    """The rank of a MODES entry (parametrized indirectly)."""
    return request.param


# -- the maths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", MODES, indirect=True)
@pytest.mark.parametrize("shape", SHAPES)
def test_tau_above_sigma_max_is_a_no_op(shape, rank):
    g = torch.randn(shape)
    tau = sigma1(g) * 1.01
    out, state = apply(spectral_clip(tau, rank=rank), [g])
    assert torch.equal(out[0], g)  # bit for bit: the correction is exactly zero
    assert float(state.clipped[0]) == 0.0
    # a Gaussian matrix has a flat spectrum, the hard case of the range finder: its estimate
    # is a lower bound, here within 1%
    assert float(state.sigma_before[0]) == pytest.approx(sigma1(g), rel=1e-2 if rank else 1e-5)
    assert float(state.sigma_before[0]) <= sigma1(g) * (1 + 1e-6)


@pytest.mark.parametrize("shape", SHAPES + [(1, 20), (20, 1)])
def test_tau_below_all_singular_values_gives_tau_u_vt(shape):
    """The orthogonalized limit: every singular value becomes tau, the direction Muon uses."""
    g = torch.randn(shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    tau = f32(0.5 * float(s.min()))  # thresholds hold their radius in float32
    out, state = apply(spectral_clip(tau, rank=None), [g])
    torch.testing.assert_close(out[0], tau * u @ vh, rtol=1e-10, atol=1e-12)
    # and it is tau times a partial isometry: all singular values equal tau
    torch.testing.assert_close(
        torch.linalg.svdvals(out[0]), torch.full_like(s, tau), rtol=1e-10, atol=0
    )
    assert float(state.sigma_after[0]) == pytest.approx(tau)


def test_orthogonalized_limit_in_randomized_mode_on_a_low_rank_matrix(kernel):
    # rank 3 < r: the randomized mode sees the whole spectrum, so tau U V^T again
    g = with_spectrum(60, 50, torch.tensor([5.0, 3.0, 2.0]))
    out, _ = apply(spectral_clip(1.0, rank=4), [g])
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    torch.testing.assert_close(out[0].double(), 1.0 * u[:, :3] @ vh[:3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_mode_matches_oracle(shape):
    g = torch.randn(shape)
    tau = 0.6 * sigma1(g)
    out, state = apply(spectral_clip(tau, rank=None), [g])
    torch.testing.assert_close(out[0].double(), oracle_clip(g, tau), rtol=1e-4, atol=1e-5)
    assert float(state.sigma_before[0]) == pytest.approx(sigma1(g), rel=1e-5)
    assert float(state.sigma_after[0]) == pytest.approx(tau, rel=1e-6)
    assert float(state.threshold[0]) == pytest.approx(tau, rel=1e-6)
    assert float(state.clipped[0]) == 1.0


@pytest.mark.parametrize("r", [3, 5])
@pytest.mark.parametrize("shape", [(80, 50), (50, 80)])
def test_randomized_equals_exact_when_r_covers_the_rank(shape, r, kernel):
    g = with_spectrum(*shape, torch.tensor([9.0, 4.0, 2.5][:3]))  # rank 3 <= r
    tau = 3.0
    out, state = apply(spectral_clip(tau, rank=r), [g])
    torch.testing.assert_close(out[0].double(), oracle_clip(g, tau), rtol=0, atol=1e-5)
    assert float(state.sigma_before[0]) == pytest.approx(9.0, rel=1e-5)


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
def test_randomized_error_is_small_on_decaying_spectra(shape, kernel):
    s = 10.0 * 0.7 ** torch.arange(min(shape), dtype=torch.float64)
    g = with_spectrum(*shape, s, seed=1)
    r, tau = 8, 0.3  # tau below sigma_8 = 0.82: all top r are clipped
    out, state = apply(spectral_clip(tau, rank=r, niter=2), [g])
    ref = oracle_topr(g, tau, r)
    err = (out[0].double() - ref).norm() / ref.norm()
    assert err < 1e-4
    assert float(state.sigma_before[0]) == pytest.approx(10.0, rel=1e-5)
    # top r clipped to tau; sigma_{r+1} = 10 * 0.7^8 ~ 0.58 is left and reported as sigma_after
    sv = torch.linalg.svdvals(out[0].double())
    assert float(sv[0]) == pytest.approx(float(s[r]), rel=1e-4)
    assert float(state.sigma_after[0]) == pytest.approx(float(s[r]), rel=1e-3)


def test_randomized_sigma1_on_a_flat_tail_spectrum(kernel):
    # a realistic shape: a few strong directions over a broad noisy bulk
    gen = torch.Generator().manual_seed(3)
    bulk = torch.randn(300, 200, generator=gen, dtype=torch.float64) / 30
    spikes = with_spectrum(300, 200, torch.tensor([6.0, 4.0, 3.0, 2.0]), seed=4).double()
    g = (bulk + spikes).float()
    _, state = apply(spectral_clip(1.0, rank=8, niter=2), [g])
    assert float(state.sigma_before[0]) == pytest.approx(sigma1(g), rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["tall", "wide"])  # wide: decomposed as a transposed view
def test_randomized_on_a_batch_with_rank_deficient_and_zero_members(dtype, layout, kernel):
    m, n = 90, 60
    mats = [
        with_spectrum(m, n, torch.tensor([7.0]), seed=1),  # rank 1
        with_spectrum(m, n, torch.tensor([5.0, 4.0, 2.0, 1.5]), seed=2),  # rank 4 = r
        torch.zeros(m, n),
        with_spectrum(m, n, 6.0 * 0.6 ** torch.arange(n, dtype=torch.float64), seed=3),  # full rank
    ]
    g = torch.stack(mats).to(dtype)
    if layout == "wide":
        g = g.mT.contiguous()
    taus = torch.tensor([3.0, 1.0, 1.0, 0.5])
    out, before, after = clip_singular_values(g, taus, rank=4, oversample=12)  # q = 16
    assert out.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-9
    for i in range(4):
        ref = oracle_topr(g[i], float(taus[i]), 4)
        torch.testing.assert_close(out[i].double(), ref, rtol=0, atol=atol)
        assert float(before[i]) == pytest.approx(sigma1(g[i]), rel=atol, abs=atol)
    assert torch.equal(out[2], g[2])  # zero stays zero
    assert float(after[3]) == pytest.approx(6.0 * 0.6**4, rel=1e-4)  # sigma_5, not clipped


def test_randomized_without_power_iterations(kernel):
    g = with_spectrum(80, 50, torch.tensor([9.0, 4.0, 2.5]))
    out, before, _ = clip_singular_values(g, 3.0, rank=4, niter=0)
    torch.testing.assert_close(out.double(), oracle_clip(g, 3.0), rtol=0, atol=1e-5)
    assert float(before) == pytest.approx(9.0, rel=1e-5)


def test_randomized_mode_on_bf16_gradients(kernel):
    g = with_spectrum(64, 96, torch.tensor([8.0, 5.0, 3.0]), seed=5).bfloat16()
    out, state = apply(spectral_clip(4.0, rank=4), [g])
    assert out[0].dtype == torch.bfloat16
    torch.testing.assert_close(out[0].double(), oracle_clip(g.float(), 4.0), rtol=2e-2, atol=2e-2)
    assert float(state.sigma_before[0]) == pytest.approx(sigma1(g), rel=1e-5)


def test_randomized_keeps_the_smaller_of_the_top_directions():
    # one strong direction, a few weaker ones and a flat bulk, as in real gradients, and all top 8
    # clipped: the power iterations must not lose the smaller ones (they would, by
    # eps (sigma_1 / sigma_i)^2, were the first sketch only scaled and not orthonormalized)
    gen = torch.Generator().manual_seed(3)
    bulk = torch.randn(400, 200, generator=gen, dtype=torch.float64) / 250
    spikes = torch.tensor([8.0, 0.66, 0.25, 0.23, 0.18, 0.17, 0.16, 0.15])
    g = (bulk + with_spectrum(400, 200, spikes, seed=4).double()).float()
    tau = 0.5 * float(torch.linalg.svdvals(g.double())[7])
    ref = oracle_topr(g, tau, 8)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        out, _, _ = clip_singular_values(g, tau, rank=8, oversample=8, generator=gen)
        # the flat bulk (sigma_9 / sigma_8 = 0.74) limits the accuracy
        assert float((out.double() - ref).norm() / (ref - g.double()).norm()) < 1e-2


def test_randomized_sigma1_on_real_gradients(kernel):
    torch.manual_seed(0)
    model = CharGPT(vocab=20, block_size=16, d=64, layers=1, heads=2)
    idx = torch.randint(0, 20, (8, 17))
    sequence_losses(model(idx[:, :-1]), idx[:, 1:]).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks")]
    assert len(grads) == 4 and all(min(g.shape) > 16 for g in grads)  # all take the randomized path
    for g in grads:
        tau = 0.5 * sigma1(g)
        out, before, _ = clip_singular_values(g, tau, rank=8, oversample=8)
        assert float(before) == pytest.approx(sigma1(g), rel=1e-3)
        ref = oracle_topr(g, tau, 8)
        assert float((out.double() - ref).norm() / (ref - g.double()).norm()) < 1e-2


def test_randomized_groups_of_several_shapes_over_steps(kernel):
    s = torch.tensor([6.0, 3.0, 2.0])  # rank 3 <= r: exact
    # (40, 600): a wide gradient corrected in several column blocks when the kernel fixture
    # picks that way (robustclip._kernels.addmm_), the last one partial
    shapes = [(120, 40), (50, 200), (64, 64), (40, 600)]
    grads = [with_spectrum(m, n, s, seed=i) for i, (m, n) in enumerate(shapes)]
    transform = spectral_clip(2.5, rank=4)
    state = None
    for _ in range(2):
        out, state = apply(transform, [g.clone() for g in grads], state=state)
        for o, g in zip(out, grads):
            torch.testing.assert_close(o.double(), oracle_clip(g, 2.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("niter", [0, 1, 3])
def test_nonfinite_guard_for_any_number_of_power_iterations(
    no_linalg_on_nonfinite, niter, kernel
):
    good = with_spectrum(40, 30, 5.0 * 0.6 ** torch.arange(20.0), seed=1)
    broken = good.clone()
    broken[3, 4] = float("nan")
    out, state = apply(spectral_clip(1.0, rank=4, niter=niter), [good, broken])
    assert state.nonfinite.tolist() == [0.0, 1.0]
    torch.testing.assert_close(out[1], broken, equal_nan=True, rtol=0, atol=0)
    atol = 1e-2 if niter == 0 else 1e-4  # no iteration: the sketch alone, less accurate
    torch.testing.assert_close(out[0].double(), oracle_topr(good, 1.0, 4), rtol=0, atol=atol)
    assert bool(torch.isfinite(state.sigma_before).all())


def test_functional_form_and_default_sketch_width():
    g = torch.randn(100, 70)
    tau = 0.5 * sigma1(g)
    out, before, after = clip_singular_values(g, tau)
    torch.testing.assert_close(out.double(), oracle_clip(g, tau), rtol=1e-4, atol=1e-5)
    assert float(after) == pytest.approx(tau, rel=1e-6)
    # batch of matrices with their own tau
    gb = torch.randn(3, 20, 10)
    taus = torch.tensor([0.5, 1.0, 100.0])
    out, before, _ = clip_singular_values(gb, taus)
    for i in range(3):
        torch.testing.assert_close(out[i].double(), oracle_clip(gb[i], float(taus[i])), rtol=1e-4, atol=1e-5)
    assert spectral_clip(1.0, rank=8).q == 16  # q = r + p >= 16 by default
    assert spectral_clip(1.0, rank=3).q == 16
    assert spectral_clip(1.0, rank=20).q == 25  # the authors' p = 5
    assert spectral_clip(1.0, rank=4, oversample=2).q == 6


def test_conv_weight_is_clipped_as_out_by_in_k_k():
    conv = nn.Conv2d(4, 6, 3)
    g = torch.randn_like(conv.weight)  # (out=6, in=4, 3, 3)
    # the matrix built by hand: row o, column (i, kh, kw) in row-major order
    mat = torch.empty(6, 4 * 3 * 3, dtype=torch.float64)
    for o, i, a, b in itertools.product(range(6), range(4), range(3), range(3)):
        mat[o, i * 9 + a * 3 + b] = float(g[o, i, a, b])
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    tau = float(s[2])
    clipped = (u * s.clamp(max=tau)) @ vh
    expect = torch.empty_like(g, dtype=torch.float64)
    for o, i, a, b in itertools.product(range(6), range(4), range(3), range(3)):
        expect[o, i, a, b] = clipped[o, i * 9 + a * 3 + b]
    for rank in (None, 2):  # the randomized mode falls back to exact on a 6-row matrix
        out, state = apply(spectral_clip(tau, rank=rank), [g], ["conv.weight"], [conv])
        torch.testing.assert_close(out[0].double(), expect, rtol=1e-5, atol=1e-6)
        assert float(state.sigma_before[0]) == pytest.approx(float(s[0]), rel=1e-5)


def test_same_shaped_layers_are_batched_and_each_keeps_its_own_threshold():
    grads = [torch.randn(30, 20) * 3, torch.randn(20, 30), torch.randn(30, 20) * 0.1]
    transform = spectral_clip(th.EMA(beta=0.5), rank=None)
    params = [torch.zeros_like(g) for g in grads]
    state = transform.init(params)
    ctx = StepContext(params, ["a", "b", "c"], modules=[None] * 3)
    # step 1: the EMA has seen nothing, so nothing is clipped
    out, state = transform.update([g.clone() for g in grads], state, ctx)
    for a, b in zip(out, grads):
        assert torch.equal(a, b)
    plan = next(iter(transform._plans.values()))
    assert [g.indices for g in plan.groups] == [(0, 1, 2)]  # wide b is batched as its transpose
    # step 2: each layer's radius is its own previous sigma_max
    new = [g * 2 for g in grads]
    out, state = transform.update([g.clone() for g in new], state, ctx)
    for i, g in enumerate(new):
        tau = sigma1(grads[i])
        assert float(state.threshold[i]) == pytest.approx(tau, rel=1e-5)
        torch.testing.assert_close(out[i].double(), oracle_clip(g, tau), rtol=1e-4, atol=1e-5)


# -- guards ---------------------------------------------------------------------------------------


@pytest.fixture
def no_linalg_on_nonfinite(monkeypatch):
    """Fail if an SVD, QR or eigendecomposition is ever handed a non-finite matrix."""
    calls = []
    for name in ("svd", "qr", "eigh"):
        real = getattr(torch.linalg, name)

        def guarded(a, *args, _real=real, _name=name, **kw):
            assert bool(torch.isfinite(a).all()), f"torch.linalg.{_name} got a non-finite matrix"
            calls.append(_name)
            return _real(a, *args, **kw)

        monkeypatch.setattr(torch.linalg, name, guarded)
    return calls


@pytest.mark.parametrize("rank", MODES, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_matrix_is_skipped_and_reported(no_linalg_on_nonfinite, rank, bad):
    decay = 5.0 * 0.6 ** torch.arange(20.0)
    good = with_spectrum(40, 30, decay, seed=1)
    broken = with_spectrum(40, 30, decay, seed=2)
    broken[7, 3] = bad
    other = with_spectrum(50, 20, decay, seed=3)
    transform = spectral_clip(th.EMA(beta=0.5), rank=rank)
    grads = [good, broken, other]
    out, state = apply(transform, grads)  # first step: EMA, nothing clipped yet
    out, state = apply(transform, [g * 3 for g in grads], state=state)
    assert no_linalg_on_nonfinite  # the decompositions did run, on finite input only
    # the broken matrix is left exactly as it was, and flagged
    torch.testing.assert_close(out[1], broken * 3, equal_nan=True, rtol=0, atol=0)
    assert state.nonfinite.tolist() == [0.0, 1.0, 0.0]
    # the others are clipped against their own history
    for i in (0, 2):
        tau = sigma1(grads[i])
        ref = oracle_clip(grads[i] * 3, tau) if rank is None else oracle_topr(grads[i] * 3, tau, rank)
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-4, atol=1e-4)
    # no NaN leaks into the readings or the thresholds; the broken layer's EMA never moved
    for key in ("sigma_before", "sigma_after", "threshold", "clipped", "clipped_fraction"):
        assert bool(torch.isfinite(state._asdict()[key][[0, 2]] if state._asdict()[key].dim() else state._asdict()[key]).all())
    assert int(state.thresholds[1].steps) == 0
    assert all(bool(torch.isfinite(t).all()) for t in state.thresholds[0])


@pytest.mark.parametrize("rank", MODES, indirect=True)
def test_zero_matrices_are_safe(rank):
    grads = [torch.zeros(40, 30), torch.zeros(30, 40), torch.zeros(5)]
    transform = spectral_clip(th.EMA(), rank=rank, clip_vectors=1.0)
    out, state = apply(transform, grads)
    out, state = apply(transform, out, state=state)  # zeros are not observed: no radius yet
    for o in out:
        assert torch.equal(o, torch.zeros_like(o))
    for key, t in transform.readings(state).items():
        if key == "threshold":  # the EMAs have seen nothing: inf, no clipping (never 0)
            assert t.tolist() == [math.inf, math.inf, 1.0]
        else:
            assert bool(torch.isfinite(t).all())
    assert state.sigma_before.tolist() == [0.0, 0.0, 0.0]


def test_bf16_and_float64_gradients():
    g64 = torch.randn(30, 20, dtype=torch.float64)
    tau = f32(0.5 * sigma1(g64))
    out, _ = apply(spectral_clip(tau, rank=None), [g64])
    assert out[0].dtype == torch.float64
    torch.testing.assert_close(out[0], oracle_clip(g64, tau), rtol=1e-10, atol=1e-12)
    gb = torch.randn(30, 20).bfloat16()
    out, _ = apply(spectral_clip(tau, rank=None), [gb])
    assert out[0].dtype == torch.bfloat16
    torch.testing.assert_close(out[0].double(), oracle_clip(gb.float(), tau), rtol=2e-2, atol=2e-2)


# -- selection ------------------------------------------------------------------------------------


def owners(model):
    """The module owning each parameter, as the Clipper's layout finds it (first owner wins)."""
    owner = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), mod)
    return [owner[id(p)] for p in model.parameters()]


def selected_names(model, **kw):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flags = spectral_clip(1.0, **kw).selected(params, names, owners(model))
    return [n for n, f in zip(names, flags) if f]


# A transcription of the selection in the authors' clipping.py (katcinskiy/spectral-clipping,
# arXiv:2605.11838): a parameter is clipped unless its name holds one of these fragments while
# not holding "LayerNorm"; every clipped gradient is read as reshape(shape[0], -1).
OFFICIAL_SKIP_FRAGMENTS = (
    "word_embeddings", "position_embeddings", "token_type_embeddings", "embed_tokens", "lm_head", "wpe", "wte",
)


def official_selection(names):
    return [n for n in names if "LayerNorm" in n or not any(f in n for f in OFFICIAL_SKIP_FRAGMENTS)]


def hf_model(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind.startswith("gpt2"):
        cfg = tf.GPT2Config(
            vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=kind == "gpt2",
        )
        return tf.GPT2LMHeadModel(cfg)
    if kind.startswith("bert"):
        cfg = tf.BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=3, pad_token_id=0,
        )
        return tf.BertForSequenceClassification(cfg) if kind == "bert-cls" else tf.BertForMaskedLM(cfg)
    cfg = tf.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=1, pad_token_id=0,
    )
    return tf.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "bert-cls", "bert-mlm", "llama"])
def test_default_selection_is_the_official_rule_on_hugging_face_models(kind):
    model = hf_model(kind)
    names = [n for n, _ in model.named_parameters()]
    got = selected_names(model)
    assert got == official_selection(names)
    # what the rule means on these models
    skipped = set(names) - set(got)
    assert skipped and all(("embed" in n or "wte" in n or "wpe" in n or "lm_head" in n) for n in skipped)
    assert any(p.dim() == 1 for n, p in model.named_parameters() if n in got)  # biases, norm gains
    if kind == "gpt2-untied" or kind == "llama":
        assert "lm_head.weight" in names and "lm_head.weight" not in got
        assert "lm_head.weight" in selected_names(model, head=None)  # head=None clips it
    if kind.startswith("bert"):
        assert "bert.embeddings.LayerNorm.weight" in got  # an embedding block's norm is clipped
    if kind == "bert-cls":
        assert {"classifier.weight", "classifier.bias"} <= set(got)  # the classifier head is clipped
        assert "classifier.weight" not in selected_names(model, head="last")


def test_official_rule_sees_through_wrapper_prefixes():
    # DDP, torch.compile and FSDP1 prefix the names; the fragments still match (substrings)
    names = ["module._orig_mod.transformer.wte.weight", "_fsdp_wrapped_module.lm_head.weight",
             "module.h.0.mlp.c_fc.weight", "module.model.embed_tokens.weight", "module.model.norm.weight"]
    params = [torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(3, 6), torch.zeros(4, 3), torch.zeros(3)]
    flags = spectral_clip(1.0).selected(params, names, [None] * len(names))
    assert [n for n, f in zip(names, flags) if f] == official_selection(names)
    assert official_selection(names) == ["module.h.0.mlp.c_fc.weight", "module.model.norm.weight"]


def test_default_selection_also_skips_embedding_modules_and_clips_a_gpt_head_not_named_lm_head():
    model = CharGPT(vocab=20, block_size=8, d=16, layers=2, heads=2)
    names = [n for n, _ in model.named_parameters()]
    got = selected_names(model)
    # robustclip's module check leaves out the nn.Embedding weights "tok" and "pos", which the
    # authors' name rule would clip; everything else is clipped, the head ("head", not
    # "lm_head") and the 1-D parameters too
    assert set(official_selection(names)) - set(got) == {"tok.weight", "pos.weight"}
    assert got == [n for n in names if n not in ("tok.weight", "pos.weight")]
    assert "head.weight" in got and "blocks.0.ln1.weight" in got
    # a tied head is the embedding's weight: listed once, as "tok.weight", and skipped with it
    tied = CharGPT(vocab=20, block_size=8, d=16, layers=2, heads=2, tied=True)
    assert selected_names(tied) == [n for n in got if n != "head.weight"]
    # the head can be named, or taken as the last Linear
    assert selected_names(model, head="head") == selected_names(model, head="last") == [n for n in got if n != "head.weight"]
    with pytest.raises(ValueError, match="head='last'.*LayerNorm"):
        selected_names(tied, head="last")  # the last parameter is ln_f's
    # robustclip's former default: matrices only, the last Linear skipped
    assert selected_names(model, head="last", clip_vectors=None) == [
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "fc", "out")
    ]


def test_default_selection_clips_a_classifier_head():
    assert selected_names(MLP([4, 6, 3])) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    cnn = SmallCNN(channels=(4, 8), hidden=16, num_classes=5, image_size=8)
    assert selected_names(cnn) == [n for n, _ in cnn.named_parameters()]  # convs as (out, in*k*k)
    assert selected_names(cnn, clip_vectors=None) == ["features.0.weight", "features.3.weight", "fc1.weight", "fc2.weight"]
    assert selected_names(cnn, head="last", clip_vectors=None) == ["features.0.weight", "features.3.weight", "fc1.weight"]


def test_head_is_found_by_name_not_by_tensor_identity():
    # under FSDP2 the tensors a transform sees are not the modules' attributes (those are
    # swapped for unsharded views): the head must still be found
    model = MLP([4, 6, 3])
    names = [n for n, _ in model.named_parameters()]
    views = [p.detach().clone() for p in model.parameters()]
    assert not any(v is p for v, p in zip(views, model.parameters()))
    flags = spectral_clip(1.0, head="last").selected(views, names, owners(model))
    assert flags == [True, True, False, False]  # "2.weight" and "2.bias", module "2"
    flags = spectral_clip(1.0, head="2").selected(views, names, owners(model))
    assert flags == [True, True, False, False]
    # "auto": a language-model head by its name, with or without a wrapper's prefix
    names = ["module.body.weight", "module.body.bias", "module.lm_head.weight", "module.lm_head.bias"]
    lin = nn.Linear(3, 5)
    params = [torch.zeros(4, 3), torch.zeros(4), torch.zeros(5, 3), torch.zeros(5)]
    flags = spectral_clip(1.0).selected(params, names, [None, None, lin, lin])
    assert flags == [True, True, False, False]
    assert spectral_clip(1.0, head=None).selected(params, names, [None, None, lin, lin]) == [True] * 4


def test_select_by_predicate_and_by_name():
    model = MLP([4, 6, 3])
    assert selected_names(model, select=["2.weight"]) == ["2.weight"]
    assert selected_names(model, select=["0.bias"]) == ["0.bias"]  # clipped as a (6, 1) matrix
    assert selected_names(model, select=lambda n, p, m: n.startswith("0.") and p.dim() == 2) == ["0.weight"]
    with pytest.raises(ValueError, match="unknown parameters"):
        selected_names(model, select=["nope.weight"])
    with pytest.raises(ValueError, match="clip_vectors=None"):
        selected_names(model, select=["0.bias"], clip_vectors=None)
    with pytest.raises(ValueError, match="matches no parameter"):
        selected_names(model, head="classifier")
    with pytest.raises(TypeError, match="clip_vectors='vectors'"):
        spectral_clip(1.0, clip_vectors="vectors")
    with pytest.raises(TypeError, match="one string"):
        spectral_clip(1.0, select="0.weight")


@pytest.mark.parametrize(
    "kw, err",
    [
        ({"rank": 0}, ValueError),
        ({"rank": 2.5}, TypeError),
        ({"niter": -1}, ValueError),
        ({"oversample": -1}, ValueError),
        ({"seed": "0"}, TypeError),
        ({"head": [1]}, TypeError),
    ],
)
def test_bad_arguments(kw, err):
    with pytest.raises(err):
        spectral_clip(1.0, **kw)
    with pytest.raises(ValueError, match="tau"):
        spectral_clip(0.0)


def test_clip_vectors_norm_clips_1d_parameters():
    model = MLP([4, 6, 3])
    grads = [torch.randn_like(p) * 5 for p in model.parameters()]
    mods = [model[0], model[0], model[2], model[2]]
    names = [n for n, _ in model.named_parameters()]
    out, state = apply(spectral_clip(1.0, rank=None, clip_vectors=0.5, head=None), grads, names, mods)
    for i in (1, 3):  # biases: norm-clipped to 0.5
        torch.testing.assert_close(out[i], grads[i] * min(1.0, 0.5 / float(grads[i].norm())))
        assert float(state.sigma_before[i]) == pytest.approx(float(grads[i].norm()), rel=1e-6)
    for i in (0, 2):
        torch.testing.assert_close(out[i].double(), oracle_clip(grads[i], 1.0), rtol=1e-4, atol=1e-5)
    # with clip_vectors=None they are untouched and read NaN (not applicable)
    out, state = apply(spectral_clip(1.0, rank=None, clip_vectors=None), grads, names, mods)
    assert torch.equal(out[1], grads[1]) and bool(state.sigma_before[1].isnan())
    assert torch.equal(out[3], grads[3]) and float(state.clipped_fraction) == 1.0  # the two matrices


def oracle_vector_clip(g: torch.Tensor, tau: float) -> torch.Tensor:
    """The spectral clip of a 1-D (or 0-D) gradient read as an (n, 1) matrix, by a full SVD."""
    return oracle_clip(g.reshape(-1), tau).reshape(g.shape)


@pytest.mark.parametrize("rank", MODES, indirect=True)
def test_vectors_are_clipped_as_n_by_1_matrices_at_tau_by_default(rank):
    gen = torch.Generator().manual_seed(0)
    mat = torch.randn(30, 20, generator=gen)
    vecs = [
        torch.randn(7, generator=gen) * 3,  # norm about 8: clipped
        torch.randn(40, generator=gen) * 0.01,  # norm about 0.06: left alone
        torch.tensor(-2.5),  # a 0-D parameter: a 1 x 1 matrix
        torch.randn(40, generator=gen, dtype=torch.float64) * 2,
    ]
    tau = f32(0.5)
    out, state = apply(spectral_clip(tau, rank=rank), [mat, *vecs])
    for o, g in zip(out[1:], vecs):
        assert o.shape == g.shape and o.dtype == g.dtype
        ref = oracle_vector_clip(g, tau)
        torch.testing.assert_close(o.double(), ref, rtol=1e-6, atol=1e-7)
        # the same as norm clipping at tau
        torch.testing.assert_close(o.double(), g.double() * min(1.0, tau / float(g.double().norm())), rtol=1e-6, atol=1e-7)
    assert torch.equal(out[2], vecs[1])  # below tau: bit for bit unchanged
    norms = [float(g.double().norm()) for g in vecs]
    assert state.sigma_before[1:].tolist() == pytest.approx(norms, rel=1e-6)
    assert state.sigma_after[1:].tolist() == pytest.approx([min(n, tau) for n in norms], rel=1e-6)
    assert state.threshold.tolist() == pytest.approx([tau] * 5)
    assert state.clipped.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert float(state.clipped_fraction) == pytest.approx(4 / 5)  # vectors count as selected


def official_ema_thresholds(values, coef=0.9):
    """The authors' SpectralClipperEMA for one parameter: tau_0 = the first value, then the
    bias-corrected EMA of the previous values (a transcription, per parameter)."""
    ema, taus = 0.0, []
    for t, v in enumerate(values):
        taus.append(v if t == 0 else max(ema / (1.0 - coef**t), 0.0))
        ema = coef * ema + (1.0 - coef) * v
    return taus


def test_vectors_follow_their_own_ema_of_their_norms_over_steps():
    gen = torch.Generator().manual_seed(1)
    shapes = [(5,), (12,), (4, 6)]
    steps = [[torch.randn(s, generator=gen) * (1 + 4 * (t % 2)) for s in shapes] for t in range(5)]
    transform = spectral_clip(th.EMA(0.9), rank=None)
    state = None
    for t, grads in enumerate(steps):
        out, state = apply(transform, grads, state=state)
        for i, g in enumerate(grads):
            sig = [sigma1(steps[k][i].reshape(shapes[i][0], -1)) for k in range(t + 1)]
            tau = official_ema_thresholds(sig)[t]
            ref = oracle_vector_clip(g, tau) if g.dim() < 2 else oracle_clip(g, tau)
            torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-6)
        if t % 2:  # a step five times larger than the one before: every parameter is clipped
            assert state.clipped.tolist() == [1.0, 1.0, 1.0]


# -- in the Clipper ---------------------------------------------------------------------------------


def test_composes_after_per_sample_clipping_in_the_clipper():
    """chain(per_sample_clip(c), spectral_clip(tau)) = spectral clip of the PS-Clip mean."""
    torch.manual_seed(0)
    model = MLP([6, 8, 5, 3])
    ref = MLP([6, 8, 5, 3])
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    c, tau = 0.5, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    clipper = rc.Clipper(
        model, opt, rc.chain(rc.per_sample_clip(c, engine="vmap"), spectral_clip(tau, rank=None))
    )
    clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
    info = clipper.step()
    clipper.close()
    # oracle: per-sample gradients from batches of one, clipped, averaged, then U min(S, tau) V^T
    params = list(ref.parameters())
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(6):
        gs = torch.autograd.grad(F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]), params)
        n = float(torch.sqrt(sum(g.double().pow(2).sum() for g in gs)))
        for a, g in zip(acc, gs):
            a += min(1.0, c / n) * g.double()
    mean = [a / 6 for a in acc]
    # every parameter, the classifier head and the biases (as (n, 1) matrices) included
    expect = [oracle_clip(g, tau) for g in mean]
    with torch.no_grad():
        for p, q, g in zip(model.parameters(), params, expect):
            torch.testing.assert_close(p.double(), q.double() - g, rtol=1e-5, atol=1e-6)
    r = info.transforms["spectral_clip"]
    flags = [float(sigma1(g) > tau) for g in mean]
    assert r["clipped"].tolist() == flags and flags[4] == 1.0  # the head (4.weight) is clipped


def gpt_run(steps, method_factory, resume_at=None):
    def fresh(seed):
        torch.manual_seed(seed)
        model = CharGPT(vocab=12, block_size=8, d=32, layers=1, heads=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, rc.Clipper(model, opt, method_factory())

    model, opt, clipper = fresh(0)
    gen = torch.Generator().manual_seed(5)
    infos = []
    for step in range(steps):
        if step == resume_at:
            buf = io.BytesIO()
            torch.save({"m": model.state_dict(), "o": opt.state_dict(), "c": clipper.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            model, opt, clipper = fresh(99)
            model.load_state_dict(saved["m"])
            opt.load_state_dict(saved["o"])
            clipper.load_state_dict(saved["c"])
        idx = torch.randint(0, 12, (4, 9), generator=gen)
        clipper.backward(sequence_losses(model(idx[:, :-1]), idx[:, 1:]))
        infos.append(clipper.step())
    return [p.detach().clone() for p in model.parameters()], infos


RULES = {
    "constant": lambda: th.Constant(0.05),
    "ema": lambda: th.EMA(),
    "window": lambda: th.WindowQuantile(q=0.5, window=3),
    "autoclip": lambda: th.AutoClip(q=0.3),
    "zclip": lambda: th.ZClip(z=0.5, warmup=2),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_state_dict_round_trip_resumes_identically_in_randomized_mode(rule):
    # d = 32 matrices (96x32, 32x32, 128x32) are wider than q = 12: the randomized path, whose
    # sketch generator state is part of the state_dict
    def method():
        return spectral_clip(RULES[rule](), rank=4, oversample=8, clip_vectors=RULES[rule]())

    straight, infos = gpt_run(6, method)
    resumed, _ = gpt_run(6, method, resume_at=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    clipped = torch.stack([i.transforms["spectral_clip"]["clipped"] for i in infos])
    assert float(clipped.nan_to_num().sum()) > 0  # the thresholds did clip


def test_readings_in_step_info_and_state_dict_loads_weights_only():
    _, infos = gpt_run(2, lambda: spectral_clip(th.EMA(), rank=4))
    r = infos[-1].transforms["spectral_clip"]
    assert set(r) == {"sigma_before", "sigma_after", "threshold", "clipped", "nonfinite", "clipped_fraction"}
    sel = ~r["sigma_before"].isnan()
    assert int(sel.sum()) == 15  # all but the two embeddings: 5 matrices (the head too), 10 vectors
    assert bool((r["sigma_after"][sel] <= r["sigma_before"][sel] * (1 + 1e-6)).all())
    as_dict = infos[-1].as_dict()
    assert isinstance(as_dict["transforms"]["spectral_clip"]["clipped_fraction"], float)


def test_randomized_mode_on_huge_but_finite_gradients(kernel, no_linalg_on_nonfinite):
    """Entries near 1e36 (float32 range ends at 3.4e38): the power iterations rescale to unit
    norm, so no factorisation sees an inf or NaN and the top singular values are still clipped
    (a sketch scaled only to max entry 1 overflows G^T T here)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, 24, generator=gen, dtype=torch.float64) @ torch.randn(24, 1024, generator=gen, dtype=torch.float64)
    small = base.float()
    s1 = sigma1(small)
    ref, ref_state = apply(spectral_clip(0.5 * s1, rank=8, seed=3), [small])
    # the same clip (same sketch) on the same matrix times 1e35: the result times 1e35
    out, state = apply(spectral_clip(0.5 * s1 * 1e35, rank=8, seed=3), [(base * 1e35).float()])
    assert bool(torch.isfinite(out[0]).all()) and no_linalg_on_nonfinite
    # (bf16 iterations round the scaled matrix differently: agreement to their precision)
    assert float((out[0].double() / 1e35 - ref[0].double()).norm() / ref[0].double().norm()) < 1e-3
    assert float(state.sigma_before[0]) / 1e35 == pytest.approx(float(ref_state.sigma_before[0]), rel=1e-4)


def test_empty_batch_of_matrices():
    out, before, _ = clip_singular_values(torch.randn(0, 64, 128), 1.0, rank=4)
    assert out.shape == (0, 64, 128) and before.shape == (0,)


def official_clip_step(model, rule, history):
    """The authors' clip loop, transcribed: every parameter of :func:`official_selection`, its
    gradient read as reshape(shape[0], -1), U min(S, tau) V^T by a full SVD (float64 here);
    ``rule`` is "constant" (tau = 0.05) or "ema" (their EMA, 0.9, per parameter)."""
    names = [n for n, _ in model.named_parameters()]
    chosen = set(official_selection(names))
    for name, p in model.named_parameters():
        if name not in chosen:
            continue
        g = p.grad.double().reshape(p.grad.shape[0], -1)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        history.setdefault(name, []).append(float(s[0]))
        tau = 0.05 if rule == "constant" else official_ema_thresholds(history[name])[-1]
        p.grad = ((u * s.clamp(max=tau)) @ vh).reshape(p.shape).to(p.dtype)


@pytest.mark.parametrize("rank", MODES, indirect=True)
@pytest.mark.parametrize("rule", ["constant", "ema"])
def test_clipper_step_on_a_gpt2_equals_the_official_clip_loop_at_every_step(rule, rank):
    from robustclip.losses import causal_lm

    model, ref = hf_model("gpt2-untied"), hf_model("gpt2-untied")  # same seed: same weights
    tau = th.Constant(0.05) if rule == "constant" else th.EMA(0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    clipper = rc.Clipper(model, opt, spectral_clip(tau, rank=rank))
    gen = torch.Generator().manual_seed(7)
    history: dict = {}
    for step in range(4):
        ids = torch.randint(2, 32, (4, 10), generator=gen)
        clipper.backward(causal_lm(model(input_ids=ids).logits, ids))
        info = clipper.step()
        ref_opt.zero_grad()
        causal_lm(ref(input_ids=ids).logits, ids).mean().backward()
        official_clip_step(ref, rule, history)
        ref_opt.step()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")
        clipped = info.transforms["spectral_clip"]["clipped"]
        if rule == "constant" or step:
            assert float(clipped.sum()) > 0  # the rule did clip, vectors and matrices alike
    clipper.close()
