"""Which parameters spectral clipping clips, told by their names.

The default follows the public code of the spectral clipping paper (Yukhimchuk et al.,
arXiv:2605.11838; katcinskiy/spectral-clipping): every parameter except the input embeddings
and the language-model head, both recognised by name fragments. robustclip also leaves out every
``nn.Embedding`` / ``nn.EmbeddingBag`` weight, whatever its name. A user may instead pass a
predicate or a list of names (``select``), name the head to leave out (``head``), and say how
1-D parameters are treated (``clip_vectors``). The head is always found by name, never by tensor
identity: under FSDP2 a module's parameters are swapped for unsharded views.

The transform that uses this is ``_spectral.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

from robustclip.thresholds import Threshold, as_threshold

__all__ = [
    "EMBEDDING_NAMES",
    "LM_HEAD_NAME",
    "Selector",
    "check_clip_vectors",
    "check_head",
    "check_select",
    "head_indices",
    "is_embedding_name",
    "is_lm_head_name",
    "selected",
]

#: ``select(name, param, module) -> bool``: whether a parameter is spectrally clipped.
Selector = Callable[[str, Tensor, "nn.Module | None"], bool]

#: name fragments of the input embeddings that the authors' code (arXiv:2605.11838) leaves
#: out, as they appear in Hugging Face and nanoGPT parameter names; a name holding one is
#: skipped unless it also holds "LayerNorm" (an embedding block's norm is clipped)
EMBEDDING_NAMES = (
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_tokens",
    "wpe",
    "wte",
)
#: the name fragment of a language-model head, which the authors' code leaves out as well
LM_HEAD_NAME = "lm_head"

#: the accepted values of ``clip_vectors`` besides a radius
_VECTOR_MODES = ("tau",)


def _is_embedding(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _named_like(name: str, fragments: Sequence[str]) -> bool:
    # substrings, as in the authors' rule: wrappers' prefixes ("module.", "_orig_mod.") and
    # suffixes (".weight", ".bias") do not hide a match
    return "LayerNorm" not in name and any(f in name for f in fragments)


def is_embedding_name(name: str) -> bool:
    """Whether the spectral paper's rule (arXiv:2605.11838) skips ``name`` as an input embedding:
    it holds one of :data:`EMBEDDING_NAMES` and not ``"LayerNorm"``."""
    return _named_like(name, EMBEDDING_NAMES)


def is_lm_head_name(name: str) -> bool:
    """Whether the spectral paper's rule skips ``name`` as a language-model head: it holds
    ``"lm_head"`` and not ``"LayerNorm"``."""
    return _named_like(name, (LM_HEAD_NAME,))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


def _owner_name(name: str) -> str:
    """The module part of a parameter name (``"blocks.0.fc"`` of ``"blocks.0.fc.weight"``)."""
    return name.rpartition(".")[0]


# -- the arguments of spectral_clip ----------------------------------------------------------------


def check_select(select: Selector | Iterable[str] | None) -> Selector | tuple[str, ...] | None:
    """``select`` as the transform keeps it: a predicate, a tuple of parameter names, or None."""
    if select is None or callable(select):
        return select
    if isinstance(select, str):
        raise TypeError(
            f"select={select!r} is one string; pass a list of parameter names, e.g. "
            f"select=[{select!r}], or a predicate select(name, param, module) -> bool."
        )
    names = tuple(select)
    if not all(isinstance(s, str) for s in names):
        raise TypeError("select must be a predicate or a list of parameter names (str).")
    return names


def check_head(head: str | Iterable[str] | None) -> str | tuple[str, ...] | None:
    """``head`` as the transform keeps it: ``"auto"``, ``"last"``, None, or a tuple of names."""
    if head is None or head in ("auto", "last"):
        return head
    if isinstance(head, str):
        return (head,)
    names = tuple(head)
    if not all(isinstance(s, str) for s in names):
        raise TypeError('head must be "auto", "last", None, or module/parameter names (str).')
    return names


def check_clip_vectors(clip_vectors: float | Threshold | str | None, tau: Threshold) -> Threshold | None:
    """The threshold of the selected 1-D parameters: ``"tau"`` clips them as (n, 1) matrices at
    ``tau``, as the authors' code does (their one singular value is their norm); a radius
    norm-clips them at that radius; None leaves them alone (and out of the selection)."""
    if isinstance(clip_vectors, str):
        if clip_vectors not in _VECTOR_MODES:  # the one string it takes; else a number
            raise TypeError(
                f"clip_vectors={clip_vectors!r}: pass 'tau' (1-D parameters clipped as (n, 1) "
                "matrices at tau, the default), a number or threshold, or None (left alone)."
            )
        return tau
    return None if clip_vectors is None else as_threshold(clip_vectors, "clip_vectors")


# -- the selection ---------------------------------------------------------------------------------


def head_indices(
    head: str | tuple[str, ...] | None, names: Sequence[str], modules: Sequence[nn.Module | None]
) -> set[int]:
    """The parameters of the output head that the default selection leaves out, found by
    name: under FSDP2 a module's parameters are swapped for unsharded views, so comparing
    tensors by identity would miss them."""
    if head is None:
        return set()
    if head == "auto":
        # a language-model head by name, as in the authors' code; a head tied to the input
        # embedding is listed once, under the embedding's name, and skipped as the embedding
        return {i for i, n in enumerate(names) if is_lm_head_name(n)}
    if head == "last":
        # the nn.Linear owning the last parameter, where models register their output layer
        if not names or not isinstance(modules[-1], nn.Linear):
            owner = "nothing" if not names else type(modules[-1]).__name__
            raise ValueError(
                f"spectral_clip(head='last') takes the nn.Linear owning the last parameter, "
                f"but {names[-1] if names else 'no parameter'!r} is owned by {owner} (the "
                "module of each parameter is known inside a Clipper); name the head, e.g. "
                "head='classifier', or pass head='auto' or head=None."
            )
        owner_name = _owner_name(names[-1])
        return {i for i, n in enumerate(names) if _owner_name(n) == owner_name}
    patterns = head if isinstance(head, tuple) else (head,)
    found = {i for i, n in enumerate(names) if _matches(n, patterns)}
    if not found:
        raise ValueError(
            f"spectral_clip(head={list(patterns)}) matches no parameter; pass module or "
            f"parameter names from {list(names)}, head='auto', head='last' or head=None."
        )
    return found


def selected(
    params: Sequence[Tensor],
    names: Sequence[str],
    modules: Sequence[nn.Module | None],
    select: Selector | tuple[str, ...] | None,
    head: str | tuple[str, ...] | None,
    vectors: bool,
) -> list[bool]:
    """Which parameters are clipped, matrices and (with ``vectors``) 1-D ones: by ``select``
    if given, else by the authors' rule with ``head`` left out (see :func:`spectral_clip`)."""
    mods = list(modules) if modules else [None] * len(params)
    if callable(select):
        out = [bool(select(n, p, m)) for n, p, m in zip(names, params, mods)]
    elif select is not None:
        unknown = [s for s in select if s not in names]
        if unknown:
            raise ValueError(
                f"spectral_clip(select=...) names unknown parameters {unknown}; the "
                f"parameters are: {list(names)}."
            )
        out = [n in select for n in names]
    else:
        # the rule of the authors' code: every parameter but the input embeddings and the
        # language-model head, by name; robustclip also skips nn.Embedding weights whatever
        # their name
        skip = head_indices(head, names, mods)
        out = [
            not is_embedding_name(n) and not _is_embedding(m) and i not in skip and (vectors or p.dim() >= 2)
            for i, (n, p, m) in enumerate(zip(names, params, mods))
        ]
    if not vectors:
        bad = [n for n, p, s in zip(names, params, out) if s and p.dim() < 2]
        if bad:
            raise ValueError(
                f"spectral_clip(clip_vectors=None) leaves 1-D parameters alone, but select "
                f"picked {bad}; pass clip_vectors='tau' (clipped as (n, 1) matrices at tau) "
                "or a radius, or leave them out of select."
            )
    return [s and p.numel() > 0 for p, s in zip(params, out)]
