"""robustclip.experiments.data: loaders checked against independent readings of the same files and laws."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch
from scipy import stats

from robustclip.experiments import data


def _ks(sample: torch.Tensor, cdf) -> float:
    """Largest gap between the empirical CDF and ``cdf`` on a grid of 41 sample quantiles."""
    x = np.sort(sample.double().numpy())
    probs = np.linspace(0.025, 0.975, 41)
    pts = np.quantile(x, probs)
    return float(np.max(np.abs(np.searchsorted(x, pts, side="right") / x.size - cdf(pts))))


@pytest.mark.parametrize(
    ("kind", "param", "cdf"),
    [
        ("gaussian", 0.0, stats.norm.cdf),
        ("student", 1.5, stats.t(1.5).cdf),
        ("student", 2.5, stats.t(2.5).cdf),
        ("student", 0.7, stats.t(0.7).cdf),  # the Gamma sampler's k < 1 branch
        ("stable", 1.0, stats.cauchy.cdf),  # alpha = 1 is Cauchy
        ("stable", 2.0, stats.norm(scale=np.sqrt(2)).cdf),  # alpha = 2 is N(0, 2)
        ("stable", 1.5, stats.levy_stable(1.5, 0.0).cdf),
    ],
)
def test_noise_laws_match_scipy(kind, param, cdf):
    g = torch.Generator().manual_seed(1)
    x = data.heavy_tailed(kind, param, (20000,), g)
    assert x.dtype == torch.float32
    # a correct sampler with n = 20000 stays within ~0.012 of the CDF (p ~ 0.01, KS bound)
    assert _ks(x, cdf) < 0.015


def test_symmetric_pareto_tail_is_exact():
    # P(|X| > t) = (1 + t)^-alpha by construction; compare with the empirical tail
    g = torch.Generator().manual_seed(2)
    x = data.heavy_tailed("pareto", 1.1, (50000,), g).abs().double()
    for t in (0.5, 2.0, 10.0):
        emp = float((x > t).double().mean())
        assert emp == pytest.approx((1 + t) ** -1.1, abs=0.01)
    sign = data.heavy_tailed("pareto", 1.5, (20000,), g)
    assert abs(float((sign > 0).double().mean()) - 0.5) < 0.015


def test_noise_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="unknown noise kind"):
        data.heavy_tailed("cauchy", 1.0, (3,), g)
    with pytest.raises(ValueError, match="positive parameter"):
        data.heavy_tailed("student", 0.0, (3,), g)
    with pytest.raises(ValueError, match="alpha <= 2"):
        data.heavy_tailed("stable", 2.5, (3,), g)


def test_digits_flips_exactly_the_share_to_other_classes():
    from sklearn.datasets import load_digits

    clean = data.load_digits(0.0, seed=3)
    noisy = data.load_digits(0.2, seed=3)
    # the same split and order; only the labels of the flipped positions differ
    assert torch.equal(clean.x_train, noisy.x_train)
    assert torch.equal(clean.y_test, noisy.y_test)
    diff = clean.y_train != noisy.y_train
    assert torch.equal(diff, noisy.flipped)
    assert int(diff.sum()) == round(0.2 * clean.y_train.numel())
    # images and labels are those of scikit-learn's digits (each training row is a digits row)
    sk = load_digits()
    rows = {tuple((r / 16.0).astype(np.float32).tolist()): int(t) for r, t in zip(sk.data, sk.target)}
    for x, y in zip(clean.x_train[:50], clean.y_train[:50]):
        assert rows[tuple(x.tolist())] == int(y)
    assert clean.x_train.shape[0] + clean.x_test.shape[0] == 1797


def test_flip_labels_errors():
    with pytest.raises(ValueError, match="label noise fraction"):
        data.load_digits(1.0)


def test_synthetic_problem_is_clean_at_test_and_heavy_tailed_in_training():
    s = data.synthetic_classification(n_train=4000, n_test=500, dim=10, alpha=1.2, seed=0)
    assert s.x_train.shape == (4000, 10) and s.x_test.shape == (500, 10)
    # test inputs are standard Gaussian; training inputs carry noise with a Pareto(1.2) radius
    assert float(s.x_test.std()) == pytest.approx(1.0, abs=0.05)
    excess = (s.x_train.norm(dim=1) / np.sqrt(10)).double()
    assert float(excess.max()) > 50  # a heavy tail: some radius is enormous
    assert float(excess.median()) < 3
    with pytest.raises(ValueError):
        data.synthetic_classification(dim=0)


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_roundtrip(tmp_path, which, archive):
    path = data.write_fake_cifar(tmp_path, which, n_train=23, n_test=7, seed=4, archive=archive)
    split = data.load_cifar(which, tmp_path)
    assert split.x_train.shape == (23, 3, 32, 32) and split.x_train.dtype == torch.uint8
    assert split.x_test.shape == (7, 3, 32, 32)
    assert split.num_classes == (10 if which == "cifar10" else 100)
    # read the first training batch independently: the CIFAR layout is row = 3 x 32 x 32, RGB planes
    key = b"labels" if which == "cifar10" else b"fine_labels"
    name = "data_batch_1" if which == "cifar10" else "train"
    if archive:
        with tarfile.open(path) as tar:
            raw = pickle.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(name))).read(), encoding="bytes")
    else:
        raw = pickle.loads((path / name).read_bytes(), encoding="bytes")
    n0 = len(raw[key])
    assert np.array_equal(split.x_train[:n0].reshape(n0, -1).numpy(), raw[b"data"])
    assert split.y_train[:n0].tolist() == list(raw[key])
    # the extracted folder itself is accepted as the root too
    if not archive:
        assert torch.equal(data.load_cifar(which, path).y_test, split.y_test)


def test_cifar_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        data.load_cifar("cifar100", tmp_path)
    with pytest.raises(ValueError, match="cifar10"):
        data.load_cifar("svhn", tmp_path)


def test_normalize_images():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = data.normalize_images(x)
    expect = (1.0 - torch.tensor(data.CIFAR_MEAN)) / torch.tensor(data.CIFAR_STD)
    assert torch.allclose(out[0, :, 0, 0], expect)


def test_text_and_corpus(tmp_path):
    std = data.load_text(None, max_chars=5000)
    assert len(std) == 5000 and "def " in std  # Python sources
    f = tmp_path / "t.txt"
    f.write_text("abcdefgh" * 100)
    text = data.load_text(str(f))
    c = data.CharCorpus(text, val_fraction=0.1)
    assert c.vocab_size == 8 and c.chars == list("abcdefgh")
    x, y = c.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    # targets are the inputs shifted by one character
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 8, y)
    with pytest.raises(FileNotFoundError):
        data.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="block_size"):
        c.batch("val", 2, 500, torch.Generator())


@pytest.mark.parametrize("old", ["data", "models"])
def test_old_module_paths_warn_and_still_work(old):
    """``robustclip.data``/``robustclip.models`` moved under ``robustclip.experiments``: the old
    paths still import every name, with a DeprecationWarning that names the new path."""
    import importlib
    import sys

    new = importlib.import_module(f"robustclip.experiments.{old}")
    sys.modules.pop(f"robustclip.{old}", None)
    with pytest.warns(DeprecationWarning, match=rf"robustclip\.{old} has moved to robustclip\.experiments\.{old}"):
        shim = importlib.import_module(f"robustclip.{old}")
    sys.modules.pop(f"robustclip.{old}", None)
    assert new.__all__ and shim.__all__ == new.__all__
    for name in new.__all__:
        assert getattr(shim, name) is getattr(new, name)
    if old == "data":
        assert shim._check_fraction is new._check_fraction  # private helpers resolve too
