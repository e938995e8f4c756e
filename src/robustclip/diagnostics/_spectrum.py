"""Top singular values of each layer's gradient, and the share of the spectrum they hold.

Spectral clipping (Yukhimchuk, Takáč, Kolar, Choudhury, arXiv:2605.11838) caps the singular
values of each matrix-shaped gradient at ``tau``; it pays off when gradients are dominated by a
few directions whose size spikes (rank-one noise). These readings tell whether that is so:
``sigma_max`` over training, and how much of the gradient's energy
``||G||_F^2 = sum_i sigma_i^2`` the top ``r`` singular values hold.

As in the spectral paper, a parameter is a matrix after ``reshape(shape[0], -1)`` (conv kernels
included) and 1-D parameters (biases, norms) have no spectrum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LayerSpectrum", "layer_spectra", "gradient_matrices", "top_singular_values"]


@dataclass(frozen=True)
class LayerSpectrum:
    """Spectrum readings of one matrix.

    Attributes:
        top: the ``r`` largest singular values, descending (a 1-D float64 tensor, host).
        sigma_max: the largest singular value.
        top_share: ``sum_{i<=r} sigma_i^2 / ||G||_F^2`` (NaN for a zero matrix).
        shape: the matrix shape after ``reshape(shape[0], -1)``.
        exact: True if computed by a full SVD, False if by ``torch.svd_lowrank``.
    """

    top: Tensor
    sigma_max: float
    top_share: float
    shape: tuple[int, int]
    exact: bool


def top_singular_values(
    m: Tensor, rank: int, *, exact_max_dim: int = 512, niter: int = 2
) -> tuple[Tensor, Tensor, bool]:
    """``(top-r singular values, ||m||_F^2, exact)`` of a 2-D tensor, all on its device.

    Nothing is read back to the host here; on CUDA, though, torch.linalg's SVD synchronizes
    with the device by itself, so a training loop should call it every few steps, not every one
    (the tracker reads the values at the end of an epoch).
    """
    m = m.detach()
    m = m.to(torch.promote_types(m.dtype, torch.float32))
    small = min(m.shape)
    energy = m.pow(2).sum()
    if small <= exact_max_dim:
        return torch.linalg.svdvals(m)[:rank], energy, True
    # randomized: q = r + 5 oversampling, as the spectral paper's clipping does
    q = min(rank + 5, small)
    _, s, _ = torch.svd_lowrank(m, q=q, niter=niter)
    return s[:rank], energy, False


def layer_spectra(
    matrices: Mapping[str, Tensor],
    rank: int = 4,
    *,
    exact_max_dim: int = 512,
    niter: int = 2,
) -> dict[str, LayerSpectrum]:
    """Top-``rank`` singular values and their share of the spectrum for each matrix.

    Args:
        matrices: name -> tensor with at least 2 dimensions (a gradient, or a weight); tensors
            with fewer dimensions are skipped.
        rank: ``r``, how many singular values to keep.
        exact_max_dim: matrices whose smaller side is at most this use ``torch.linalg.svdvals``
            (exact); larger ones ``torch.svd_lowrank`` with ``q = r + 5`` and ``niter`` power
            iterations, which slightly underestimates the top values.
        niter: power iterations of the randomized SVD.

    Returns:
        name -> :class:`LayerSpectrum`, in the order given.

    Example::

        spec = rcd.layer_spectra(rcd.gradient_matrices(model), rank=4)
        {name: s.sigma_max for name, s in spec.items()}
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}.")
    if not isinstance(matrices, Mapping):
        raise TypeError(
            "matrices must be a mapping name -> tensor (e.g. rcd.gradient_matrices(model)), got "
            f"{type(matrices).__name__}."
        )
    out: dict[str, LayerSpectrum] = {}
    for name, t in matrices.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"matrices[{name!r}] must be a tensor, got {type(t).__name__}.")
        if t.dim() < 2:
            continue
        m = t.detach().reshape(t.shape[0], -1)
        top, en, exact = top_singular_values(m, rank, exact_max_dim=exact_max_dim, niter=niter)
        top = top.double().cpu()
        energy = float(en)
        share = float(top.pow(2).sum()) / energy if energy > 0 else float("nan")
        out[name] = LayerSpectrum(
            top=top,
            sigma_max=float(top[0]) if top.numel() else 0.0,
            top_share=min(share, 1.0),
            shape=(m.shape[0], m.shape[1]),
            exact=exact,
        )
    return out


def gradient_matrices(model: nn.Module, *, skip_embeddings: bool = True) -> dict[str, Tensor]:
    """The matrix-shaped gradients ``p.grad`` of a model, by parameter name.

    Embedding tables are skipped by default, as spectral clipping skips them (their gradient
    is sparse by rows and its spectrum says little about noise).
    """
    skip: set[int] = set()
    if skip_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                skip.update(id(p) for p in m.parameters(recurse=False))
    return {
        n: p.grad
        for n, p in model.named_parameters()
        if p.grad is not None and p.dim() >= 2 and id(p) not in skip
    }
