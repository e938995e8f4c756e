"""Data for the experiments: embedded sets, local files, synthetic problems.

Nothing here downloads anything. The embedded data (scikit-learn's ``digits``, the synthetic
problems, and the Python standard library's source text) is always there; CIFAR is read from the
standard python-format archives on a local path.

* :func:`load_digits` -- the 8x8 digits (1797 images) with a share of training labels flipped.
* :func:`heavy_tailed` -- Gaussian, Student-t, symmetric Pareto and symmetric alpha-stable noise.
* :func:`synthetic_classification` -- a linear-teacher classification problem whose training
  inputs carry heavy-tailed noise (so per-sample gradients are heavy-tailed).
* :func:`load_text`, :class:`CharCorpus` -- a character corpus (default: stdlib sources).
* :func:`load_cifar` -- CIFAR-10/100 from ``cifar-10-batches-py``/``cifar-100-python`` folders
  or their ``.tar.gz`` archives.
"""

from __future__ import annotations

import io
import math
import pickle
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from robustclip.experiments._safe_pickle import load_data_pickle

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "NOISE_KINDS",
    "CharCorpus",
    "Split",
    "find_cifar",
    "flip_labels",
    "heavy_tailed",
    "load_cifar",
    "load_digits",
    "load_text",
    "normalize_images",
    "stdlib_corpus",
    "synthetic_classification",
    "write_fake_cifar",
]


@dataclass
class Split:
    """Training and test tensors, plus which training labels were corrupted (if any)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    flipped: Tensor | None = None  # bool mask over the training set
    num_classes: int = 0


def _check_fraction(value: float, name: str, upper: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < upper:
        raise ValueError(f"{name} must be a number in [0, {upper}), got {value!r}.")
    return float(value)


def flip_labels(y: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Replace ``round(fraction * N)`` labels by a uniformly drawn *different* class.

    Returns the new labels and the boolean mask of flipped positions.
    """
    fraction = _check_fraction(fraction, "label noise fraction")
    n = y.shape[0]
    k = int(round(fraction * n))
    idx = torch.randperm(n, generator=generator)[:k]
    # adding 1..C-1 modulo C always lands on another class, uniformly
    shift = torch.randint(1, num_classes, (k,), generator=generator)
    y = y.clone()
    y[idx] = (y[idx] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return y, mask


def load_digits(label_noise: float = 0.2, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], with training labels flipped.

    Args:
        label_noise: share of *training* labels replaced by another class (the test set stays
            clean, so test accuracy measures how well a method ignored the noise).
        test_fraction: share of the 1797 images held out, stratified by nothing (a seeded shuffle).
        seed: the shuffle and the flips.
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - sklearn is an experiments extra
        raise ImportError(
            "the digits data ships with scikit-learn; install it with "
            "pip install 'robustclip[experiments]'."
        ) from e
    _check_fraction(test_fraction, "test_fraction")
    d = _sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    y_tr, flipped = flip_labels(y[tr], label_noise, 10, g)
    return Split(x[tr], y_tr, x[te], y[te], flipped, 10)


# -- heavy-tailed noise ---------------------------------------------------------------------------

#: noise laws understood by :func:`heavy_tailed`; the parameter is nu (Student-t) or alpha
NOISE_KINDS = ("gaussian", "student", "pareto", "stable")


def heavy_tailed(kind: str, param: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Independent zero-median noise of a given law, float32.

    * ``"gaussian"``: standard normal (``param`` ignored).
    * ``"student"``: Student-t with ``nu = param`` degrees of freedom (infinite variance for
      ``nu <= 2``).
    * ``"pareto"``: symmetric Pareto, ``sign * (U^(-1/alpha) - 1)`` with ``alpha = param``; tail
      ``P(|X| > t) ~ t^-alpha``.
    * ``"stable"``: symmetric alpha-stable (Chambers-Mallows-Stuck), ``0 < alpha <= 2``.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}.")
    if kind == "gaussian":
        return torch.randn(shape, generator=generator)
    if not (isinstance(param, (int, float)) and param > 0):
        raise ValueError(f"{kind} noise needs a positive parameter, got {param!r}.")
    if kind == "student":
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        # chi-square(nu) = 2 * Gamma(nu/2, 1): sampled with the generator by inverse-free means
        chi2 = _gamma(param / 2.0, shape, generator) * 2.0
        return (z / torch.sqrt(chi2 / param)).float()
    if kind == "pareto":
        u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        sign = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
        return (sign * (u.pow(-1.0 / param) - 1.0)).float()
    if param > 2:
        raise ValueError(f"alpha-stable noise needs 0 < alpha <= 2, got {param!r}.")
    a = float(param)
    v = (torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5) * math.pi
    w = -torch.log(torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300))
    if abs(a - 1.0) < 1e-12:
        return torch.tan(v).float()
    x = torch.sin(a * v) / torch.cos(v).pow(1.0 / a) * (torch.cos(v - a * v) / w).pow((1.0 - a) / a)
    return x.float()


def _gamma(shape_k: float, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Gamma(k, 1) samples drawn from ``generator`` (Marsaglia-Tsang; boosted for k < 1)."""
    k = float(shape_k)
    boost = k < 1.0
    kk = k + 1.0 if boost else k
    d = kk - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    n = int(np.prod(size)) if size else 1
    out = torch.empty(n, dtype=torch.float64)
    filled = 0
    while filled < n:
        m = max(2 * (n - filled), 16)
        x = torch.randn(m, generator=generator, dtype=torch.float64)
        u = torch.rand(m, generator=generator, dtype=torch.float64)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        acc = (d * v)[ok]
        take = min(acc.numel(), n - filled)
        out[filled : filled + take] = acc[:take]
        filled += take
    if boost:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        out = out * u.pow(1.0 / k)
    return out.reshape(size)


def synthetic_classification(
    n_train: int = 2000,
    n_test: int = 1000,
    dim: int = 20,
    num_classes: int = 4,
    alpha: float = 1.2,
    noise: float = 1.0,
    seed: int = 0,
) -> Split:
    """The synthetic heavy-tailed problem: Gaussian inputs, heavy-tailed input noise.

    A random linear teacher labels Gaussian inputs ``x ~ N(0, I_d)`` by ``argmax W x``. Each
    training input is then moved by ``noise * sqrt(d) * R * u``: ``u`` a uniform random
    direction and ``R = U^(-1/alpha) - 1`` (``U`` uniform), a Pareto radius with tail
    ``P(R > t) ~ t^-alpha`` -- infinite variance for ``alpha < 2``. Labels stay those of the clean
    input, so a sample with a large ``R`` has a large gradient that points nowhere useful: the
    heavy-tailed gradient noise of Nobile & Grohs (arXiv:2605.02701), living in the data so that
    per-sample clipping can act on it. Test inputs are clean.
    """
    if dim < 1 or num_classes < 2:
        raise ValueError(f"need dim >= 1 and num_classes >= 2, got dim={dim}, num_classes={num_classes}.")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"need n_train, n_test >= 1, got {n_train}, {n_test}.")
    if not alpha > 0 or noise < 0:
        raise ValueError(f"need alpha > 0 and noise >= 0, got alpha={alpha}, noise={noise}.")
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(num_classes, dim, generator=g)
    x = torch.randn(n_train + n_test, dim, generator=g)
    y = (x @ w.T).argmax(1)
    u = torch.randn(n_train, dim, generator=g)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    radius = heavy_tailed("pareto", alpha, (n_train,), g).abs()
    x_tr = x[:n_train] + noise * math.sqrt(dim) * radius[:, None] * u
    return Split(x_tr, y[:n_train], x[n_train:], y[n_train:], None, num_classes)


# -- text -----------------------------------------------------------------------------------------


def stdlib_corpus(max_chars: int = 2_000_000) -> str:
    """Concatenated source of the Python standard library (sorted files, capped in size).

    Always present wherever Python is, so the ``accumulation`` experiment needs no download.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for p in sorted(root.glob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(
            f"found no .py files under the standard library directory {str(root)!r}; pass a text "
            "file instead (--set data=PATH)."
        )
    return "".join(parts)[:max_chars]


def load_text(path: str | None = None, max_chars: int = 2_000_000) -> str:
    """The text of ``path`` (UTF-8, undecodable bytes replaced), or the stdlib corpus if None."""
    if max_chars < 1000:
        raise ValueError(f"max_chars must be at least 1000, got {max_chars}.")
    if not path:
        return stdlib_corpus(max_chars)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist; pass a readable text file.")
    text = p.read_text(encoding="utf-8", errors="replace")[:max_chars]
    if len(text) < 100:
        raise ValueError(f"text file {str(p)!r} has only {len(text)} characters; need at least 100.")
    return text


class CharCorpus:
    """A text encoded as character ids, split into training and validation parts.

    Characters are the sorted set of the text; the last ``val_fraction`` of the text is the
    validation part (a contiguous tail, as nanoGPT does).
    """

    def __init__(self, text: str, val_fraction: float = 0.1) -> None:
        _check_fraction(val_fraction, "val_fraction")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n_val = max(int(len(ids) * val_fraction), 2)
        self.train = ids[:-n_val]
        self.val = ids[-n_val:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows: inputs ``(B, T)`` and next-character targets."""
        data = self.train if split == "train" else self.val
        if len(data) <= block_size + 1:
            raise ValueError(
                f"the {split} text has {len(data)} characters, fewer than block_size + 2 = "
                f"{block_size + 2}; use a longer text or a smaller block_size."
            )
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        x = torch.stack([data[i : i + block_size] for i in ix.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix.tolist()])
        return x, y


# -- CIFAR ----------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}

#: per-channel mean and std of the CIFAR-10 training images (used for both data sets)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _missing_cifar(which: str, root: Path) -> FileNotFoundError:
    spec = _CIFAR[which]
    return FileNotFoundError(
        f"{which} data not found under {str(root)!r}. robustclip downloads nothing: fetch "
        f"{spec['url']} elsewhere and put either the archive {spec['archive']!r} or its extracted "
        f"folder {spec['folder']!r} into that directory (or pass --set data_dir=DIR pointing to "
        "where they are)."
    )


def _read_batches(members: dict[str, bytes], names: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for n in names:
        d = load_data_pickle(members[n], f"CIFAR batch {n!r}")
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        if "data" not in d or label_key not in d:
            raise ValueError(f"CIFAR batch {n!r} has no 'data'/{label_key!r} entries; is it the python version?")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _check_cifar(which: str) -> str:
    if which not in _CIFAR:
        raise ValueError(f"unknown CIFAR variant {which!r}; choose 'cifar10' or 'cifar100'.")
    return which


def find_cifar(which: str, root: str | Path) -> Path:
    """The extracted folder or the archive of ``which`` under ``root``; a clear error if absent."""
    spec = _CIFAR[_check_cifar(which)]
    root = Path(root).expanduser()
    wanted = spec["train"] + spec["test"]
    for cand in (root / spec["folder"], root):
        if cand.is_dir() and all((cand / n).is_file() for n in wanted):
            return cand
    archive = root / spec["archive"] if root.is_dir() else root
    if archive.is_file() and archive.name.endswith((".tar.gz", ".tgz")):
        return archive
    raise _missing_cifar(which, root)


def load_cifar(which: str, root: str | Path) -> Split:
    """CIFAR-10 or CIFAR-100 from the standard python-format files under ``root``.

    ``root`` may hold the extracted folder (``cifar-10-batches-py``, ``cifar-100-python``), the
    ``.tar.gz`` archive, or be the extracted folder itself. Returns uint8 images ``(N, 3, 32, 32)``
    and int64 labels; normalise with :func:`normalize_images`.
    """
    spec = _CIFAR[_check_cifar(which)]
    wanted = spec["train"] + spec["test"]
    where = find_cifar(which, root)
    members: dict[str, bytes] = {}
    if where.is_dir():
        members = {n: (where / n).read_bytes() for n in wanted}
    else:
        with tarfile.open(where, "r:gz") as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if base in wanted and m.isfile():
                    fh = tar.extractfile(m)
                    assert fh is not None
                    members[base] = fh.read()
        if set(members) != set(wanted):
            raise ValueError(
                f"archive {str(where)!r} lacks {sorted(set(wanted) - set(members))}; is it the "
                f"python-format {spec['archive']}?"
            )
    x_tr, y_tr = _read_batches(members, spec["train"], spec["label_key"])
    x_te, y_te = _read_batches(members, spec["test"], spec["label_key"])
    return Split(
        torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te),
        None, spec["classes"],
    )


def normalize_images(x: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` -> float32 standardised by the CIFAR channel statistics."""
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def write_fake_cifar(root: str | Path, which: str, n_train: int, n_test: int, seed: int = 0, archive: bool = False) -> Path:
    """Write a tiny random data set in the CIFAR python format (for tests and dry runs).

    Returns the folder (or archive) written under ``root``.
    """
    spec = _CIFAR[which]
    rng = np.random.default_rng(seed)
    root = Path(root)
    files: dict[str, bytes] = {}
    n_batches = len(spec["train"])
    for i, n in enumerate(spec["train"]):
        m = n_train // n_batches + (1 if i < n_train % n_batches else 0)
        files[n] = _fake_batch(rng, m, spec["label_key"], spec["classes"])
    files[spec["test"][0]] = _fake_batch(rng, n_test, spec["label_key"], spec["classes"])
    if archive:
        root.mkdir(parents=True, exist_ok=True)
        path = root / spec["archive"]
        with tarfile.open(path, "w:gz") as tar:
            for n, b in files.items():
                info = tarfile.TarInfo(f"{spec['folder']}/{n}")
                info.size = len(b)
                tar.addfile(info, io.BytesIO(b))
        return path
    folder = root / spec["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    for n, b in files.items():
        (folder / n).write_bytes(b)
    return folder


def _fake_batch(rng: np.random.Generator, n: int, label_key: str, classes: int) -> bytes:
    labels = rng.integers(0, classes, n)
    # class-dependent mean colour, so a model can learn something from the fake images
    base = (labels[:, None] * 37 % 256).astype(np.float64)
    data = np.clip(base + rng.normal(0, 40, (n, 3072)), 0, 255).astype(np.uint8)
    d = {b"data": data, label_key.encode(): labels.tolist(), b"batch_label": b"fake"}
    return pickle.dumps(d, protocol=2)
