"""The pilot: candidate methods race on the user's own problem.

A statistic says which clipping a problem *could* need; only training says which one wins. The
pilot trains every candidate (a method and a radius) from a common point, on the same data
order and the same random stream (paired arms), and ranks them by the same metric: as every
arm sees the same batches at the same step, the batches' own noise cancels in the difference.

The horizon is the difficulty: a race of a few percent of the run favours whatever makes the
fastest early progress (no clipping, large radii, batch-level clipping), which is not what wins
a long run. Two race designs:

* :func:`staged_race` (the default of ``diagnose``): method first, then radius. Stage 1 races
  the baseline and each method at its middle radius; stage 2 races the winner's three radii
  from the point stage 1 reached, so the finer choice is judged nearer the end of training.
  With the budget split over two questions instead of all arms, each arm runs twice as long as
  an even split would give.
* :func:`successive_halving` (Jamieson & Talwalkar, arXiv:1502.07943; Hyperband,
  arXiv:1603.06560) with ``eta = 3``: all arms for a first rung, the best third for a rung three
  times as long; before each rung the survivors restart from the leader's weights and optimizer
  state (the exploit step of population-based training, Jaderberg et al., arXiv:1711.09846).

Both branch the arms from a common trunk (the statistics run) rather than the initialisation,
read the metric six times per rung and score the rung by its curve carried ahead
(:func:`extrapolate`, Aitken's delta-squared), capped at the descent the rung itself showed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import robustclip as rc

__all__ = [
    "Candidate",
    "Arm",
    "PilotTrainer",
    "staged_race",
    "successive_halving",
    "rung_lengths",
    "extrapolate",
    "steps_to_reach",
    "matched_progress",
    "METHODS",
]

#: the methods the pilot knows, in the order ties are broken
METHODS = ("none", "per_sample_clip", "clip_by_global_norm", "spectral_clip")

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Candidate:
    """One arm of the pilot: a method and its radius.

    Attributes:
        method: one of :data:`METHODS`.
        radius: the clipping radius (``c`` or ``tau``); ``None`` for ``"none"``.
        quantile: the quantile of the observed statistic the radius was read from.
    """

    method: str
    radius: float | None = None
    quantile: float | None = None

    @property
    def label(self) -> str:
        if self.radius is None:
            return self.method
        return f"{self.method}({self.radius:.3g})"

    def snippet(self) -> str:
        """A line of robustclip code that applies this candidate."""
        if self.method == "none":
            return "rc.Clipper(model, opt, rc.mean())  # or plain loss.mean().backward(); opt.step()"
        return f"rc.Clipper(model, opt, rc.{self.method}({self.radius:.4g}))"

    def build(self, noise: Any | None, engine: str, observe_norms: bool = False) -> Any:
        """The robustclip method of this candidate; ``noise`` (a batch-level transform, e.g. a
        synthetic problem's injected gradient noise) acts on the gradient before the method's
        own transforms. ``observe_norms`` makes the baseline compute the mean gradient the
        per-sample way (``per_sample_clip(None)``), so that its steps report every norm."""
        if self.method != "none" and self.radius is None:
            raise ValueError(f"candidate {self.method} needs a radius.")
        radius = float(self.radius) if self.radius is not None else math.inf
        if self.method == "none":
            est: Any = rc.per_sample_clip(None, engine=engine) if observe_norms else rc.mean()
            post: list[Any] = []
        elif self.method == "per_sample_clip":
            est, post = rc.per_sample_clip(radius, engine=engine), []
        elif self.method == "clip_by_global_norm":
            est, post = rc.mean(), [rc.clip_by_global_norm(radius)]
        elif self.method == "spectral_clip":
            est, post = rc.mean(), [rc.spectral_clip(radius)]
        else:
            raise ValueError(f"unknown pilot method {self.method!r}; choose one of {list(METHODS)}.")
        pieces = [est, *([noise] if noise is not None else []), *post]
        return rc.chain(*pieces)


@dataclass
class Arm:
    """A candidate's training run inside the pilot, resumable between rungs."""

    candidate: Candidate
    model: nn.Module
    optimizer: torch.optim.Optimizer
    clipper: Any
    rng_state: Tensor
    batches: Iterator[Any] | None = None
    epoch: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    run_of_skips: int = 0
    padded: int = 0  # leading NaN losses of a stage-2 arm (steps it inherited, not trained)
    scores: list[float] = field(default_factory=list)
    readings: list[list[float]] = field(default_factory=list)
    eliminated_at: int | None = None
    diverged: bool = False
    #: set when :func:`matched_progress` preferred this arm to the rung's leader: the leader's
    #: label, the steps this arm needs to reach its level, and the planned steps still to come
    caught_up: tuple[str, float, int] | None = None


class PilotTrainer:
    """Trains arms a few steps at a time, deterministically given ``seed``.

    Every arm starts from the same parameters (``model_fn()`` under ``torch.manual_seed(seed)``,
    or a deep copy of the given module) and the same global RNG state; each arm keeps its own
    RNG state between rungs, and a new pass over the loader starts after seeding the global RNG
    from ``(seed, epoch)``, so a shuffling ``DataLoader`` gives every arm the same batches.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module] | nn.Module,
        loss_fn: LossFn,
        loader: Iterable[Any],
        optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        *,
        seed: int,
        device: torch.device,
        noise_fn: Callable[[], Any] | None,
        engine: str,
    ) -> None:
        self.model_fn = model_fn
        self.loss_fn = loss_fn
        self.loader = loader
        self.optimizer_fn = optimizer_fn
        self.seed = int(seed)
        self.device = device
        self.noise_fn = noise_fn
        self.engine = engine
        self._template = copy.deepcopy(model_fn) if isinstance(model_fn, nn.Module) else None

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if self._template is not None:
            return copy.deepcopy(self._template).to(self.device)
        assert callable(self.model_fn)
        m = self.model_fn()
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"model_fn() must return a torch.nn.Module, got {type(m).__name__}; pass a "
                "factory such as lambda: MyNet() or the module itself (it is deep-copied)."
            )
        return m.to(self.device)

    def new_arm(self, cand: Candidate, *, observe_norms: bool = False) -> Arm:
        model = self.new_model()
        opt = self.optimizer_fn(model.parameters())
        noise = self.noise_fn() if self.noise_fn is not None else None
        clipper = rc.Clipper(model, opt, cand.build(noise, self.engine, observe_norms))
        gen = torch.Generator().manual_seed(self.seed)
        return Arm(cand, model, opt, clipper, gen.get_state())

    def branch(self, trunk: Arm, cand: Candidate) -> Arm:
        """A new arm for ``cand`` that starts where ``trunk`` stands: its weights, optimizer
        state and RNG state, and the next pass over the loader (so every branch sees the same
        batches). Its step count starts at 0."""
        arm = self.new_arm(cand)
        arm.model.load_state_dict(trunk.model.state_dict())
        arm.optimizer.load_state_dict(trunk.optimizer.state_dict())
        arm.rng_state = trunk.rng_state.clone()
        arm.epoch = trunk.epoch + 1
        return arm

    def _next_batch(self, arm: Arm) -> Any:
        for _ in range(2):
            if arm.batches is None:
                torch.manual_seed(hash((self.seed, arm.epoch)) & 0x7FFF_FFFF)
                arm.batches = iter(self.loader)
            try:
                return next(arm.batches)
            except StopIteration:
                arm.batches = None
                arm.epoch += 1
        raise ValueError("the loader yielded no batch; pass a loader over a non-empty data set.")

    def train(self, arm: Arm, steps: int, on_step: Callable[[Arm, Any], None] | None = None) -> None:
        """Run ``steps`` more optimizer steps of ``arm`` (stops early once it diverged)."""
        outer = torch.get_rng_state()
        torch.set_rng_state(arm.rng_state)
        try:
            for _ in range(steps):
                if arm.diverged:
                    break
                batch = self._next_batch(arm)
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                arm.model.train()
                arm.clipper.backward(self.loss_fn(arm.model(x), y))
                info = arm.clipper.step()
                if on_step is not None:
                    on_step(arm, info)
                loss = float(info.loss) if info.loss is not None else math.nan
                arm.steps += 1
                if info.skipped or not math.isfinite(loss):
                    arm.skipped += 1
                    arm.run_of_skips += 1
                    arm.losses.append(math.nan)
                    # a run of non-finite steps, or more than a quarter of all: diverged
                    if arm.run_of_skips >= 5 or arm.skipped > max(2, arm.steps // 4):
                        arm.diverged = True
                else:
                    arm.run_of_skips = 0
                    arm.losses.append(loss)
        finally:
            arm.rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)

    def close(self, arm: Arm) -> None:
        arm.clipper.close()


#: relative margin by which a clipping arm must beat the baseline to be the verdict
BASELINE_TIE = 0.01
#: a clipping method overrules the statistics' favourite only by this relative margin ...
OVERRULE_GAP = 0.05
#: ... and this many standard errors of the paired per-step loss difference
OVERRULE_Z = 2.0
#: readings of the metric per rung (two per third of the rung)
READINGS = 6
#: how far ahead a rung's curve may be extrapolated, in thirds of the rung
LOOKAHEAD = 6
#: a smaller per-sample radius takes the verdict when, at its own rate, it reaches the leader's
#: level within this share of the planned steps still to come (:func:`matched_progress`)
MATCH_SHARE = 0.5


def _metric(arm: Arm, metric_fn: Callable[[nn.Module], float]) -> float:
    was = arm.model.training
    arm.model.eval()
    try:
        with torch.no_grad():
            v = float(metric_fn(arm.model))
    finally:
        arm.model.train(was)
    return v if math.isfinite(v) else math.inf


def run_rung(
    trainer: PilotTrainer, arm: Arm, end: int, metric_fn: Callable[[nn.Module], float] | None
) -> list[float]:
    """Train ``arm`` up to step ``end`` in :data:`READINGS` chunks; the metric after each chunk
    (the chunk's mean training loss without ``metric_fn``; ``inf`` once diverged)."""
    start = arm.steps
    cuts = [start + round((end - start) * (i + 1) / READINGS) for i in range(READINGS)]
    out: list[float] = []
    for cut in cuts:
        before = arm.steps
        if cut > arm.steps:
            trainer.train(arm, cut - arm.steps)
        if arm.diverged:
            out.append(math.inf)
        elif metric_fn is not None:
            out.append(_metric(arm, metric_fn))
        else:
            w = np.asarray(arm.losses[before:], dtype=np.float64)
            out.append(float(w.mean()) if w.size and np.all(np.isfinite(w)) else (out[-1] if out else math.inf))
    return out


def extrapolate(readings: Sequence[float], lookahead: float = LOOKAHEAD) -> float:
    """The rung's curve carried ``lookahead`` thirds of a rung ahead, by Aitken's delta-squared.

    The readings are averaged per third of the rung, ``M1, M2, M3``, and fitted with the
    geometric approach ``M_k = m_inf + A x^k`` that a linearly converging method follows (three
    points, three unknowns): ``x = (M3 - M2)/(M2 - M1)``,
    ``m_inf = M3 - (M3 - M2) x/(1 - x)``. Only a curve that falls and flattens
    (``0 < x < 1``) is extrapolated, to ``m_inf + (M3 - m_inf) x^lookahead``; any other
    (flat, noisy, rising) stays at ``M3``, and the credited gain is at most the descent seen in
    the rung, ``M1 - M3``. A positive metric is fitted in log space (the floor stays positive).
    This is the short-horizon correction of the race:
    an arm that is still descending steadily at the rung's end is credited with the descent it
    will make, so a slower but less noisy method is not judged by its transient alone.
    """
    r = np.asarray(readings, dtype=np.float64)
    if r.size < 3 or not np.all(np.isfinite(r)):
        return float(r[-1]) if r.size and math.isfinite(r[-1]) else math.inf
    # a positive metric (a loss, an error) is extrapolated in log space, so that the
    # prediction stays positive and a curve that halves per third reads as steady
    log = bool(np.all(r > 0))
    t = np.log(r) if log else r
    m1, m2, m3 = (float(c.mean()) for c in np.array_split(t, 3))
    d1, d2 = m2 - m1, m3 - m2
    pred = m3
    if d1 < 0 and d2 < 0 and 0 < d2 / d1 < 1:
        x = d2 / d1
        m_inf = m3 + d2 * x / (1 - x)
        # never credit more than the descent already seen within the rung: noise in three
        # averages can fake a fast approach to a low floor
        pred = max(m_inf + (m3 - m_inf) * x**lookahead, m3 - (m1 - m3))
    return float(math.exp(pred)) if log else float(pred)


def steps_to_reach(readings: Sequence[float], rung_steps: int, target: float) -> float:
    """Steps a curve needs, descending at the rate it showed over the rung, to reach ``target``.

    ``readings`` are taken at equal intervals over a rung of ``rung_steps`` steps (the last at
    its end). A least-squares line through them (in log space when they and ``target`` are
    positive, so that the rate is a rate of relative descent) gives the rate; only a
    significant descent counts, a slope at least :data:`OVERRULE_Z` standard errors below zero.
    The answer is the steps from the rung's end until the line reaches ``target``: ``0`` when
    the line's end is already at or below it, ``inf`` for a curve that does not descend
    significantly (flat, noisy, rising or not finite). A constant rate in log space is
    conservative for clipped SGD far from its floor: while most samples are clipped the
    distance to the optimum falls by a roughly fixed amount per step, so the relative descent
    speeds up as the distance shrinks.
    """
    r = np.asarray(readings, dtype=np.float64)
    if r.size < 3 or rung_steps < 1 or not np.all(np.isfinite(r)) or not math.isfinite(target):
        return math.inf
    log = bool(np.all(r > 0) and target > 0)
    t = np.log(r) if log else r
    goal = math.log(target) if log else target
    steps = np.arange(1, r.size + 1, dtype=np.float64) * (rung_steps / r.size)
    slope, icpt = np.polyfit(steps, t, 1)
    end = float(slope * steps[-1] + icpt)
    if end <= goal:
        return 0.0
    resid = t - (slope * steps + icpt)
    se = math.sqrt(float(resid @ resid) / (r.size - 2) / float(((steps - steps.mean()) ** 2).sum()))
    if not slope < -OVERRULE_Z * se:
        return math.inf
    return (end - goal) / float(-slope)


def matched_progress(arms: Sequence[Arm], rung_steps: int, horizon: int, share: float = MATCH_SHARE) -> tuple[Arm, float] | None:
    """The smallest-radius arm that catches up with the leader within the planned run, if any.

    ``arms`` are one method's radii after the same rung, best score first (the leader). For
    per-sample clipping under heavy-tailed noise at a constant step size, the level a run
    settles at grows with the radius: the clipped noise's variance per unit of mean gradient it
    keeps, ``E[min(|xi|, c)^2] / E[min(1, c/|xi|)]``, grows with ``c``, without bound when the
    noise has no variance. A smaller radius is slower at first but settles lower, so once it
    has reached the level a larger radius stands at, it keeps going below. A rung of a few
    percent of the run cannot show that crossing; what it can show is the rate at which the
    smaller radius descends. This rule compares the arms at matched progress: an arm with a
    smaller radius than the leader whose significant descent (:func:`steps_to_reach`) reaches
    the leader's level (the mean of its last third of readings) within ``share`` of the
    ``horizon`` (planned steps still to come after the rung) is preferred, the smallest such
    first, so that at least the rest of the run is spent below the leader's level.

    Returns the arm and its steps to reach the leader's level, or ``None`` (keep the leader).
    """
    if len(arms) < 2 or horizon <= 0:
        return None
    lead = arms[0]
    if lead.candidate.radius is None or not lead.readings or lead.diverged:
        return None
    last = np.asarray(lead.readings[-1], dtype=np.float64)
    tail = last[last.size - max(1, last.size // 3) :]
    if not np.all(np.isfinite(tail)):
        return None
    level = float(np.exp(np.log(tail).mean())) if np.all(tail > 0) else float(tail.mean())
    smaller = sorted(
        (a for a in arms[1:] if a.candidate.radius is not None and a.candidate.radius < lead.candidate.radius
         and a.readings and not a.diverged),
        key=lambda a: float(a.candidate.radius or 0.0),
    )
    for arm in smaller:
        need = steps_to_reach(arm.readings[-1], rung_steps, level)
        if need <= share * horizon:
            return arm, need
    return None


def rung_score(readings: Sequence[float], extrapolate_curve: bool) -> float:
    """An arm's score for a rung from its readings (lower is better): the last third's mean,
    or with ``extrapolate_curve`` the curve carried ahead (:func:`extrapolate`)."""
    r = [v for v in readings]
    if not r or not math.isfinite(r[-1]):
        return math.inf
    if extrapolate_curve:
        return extrapolate(r)
    last = np.asarray(r[len(r) - max(1, len(r) // 3) :], dtype=np.float64)
    return float(last.mean())


def rung_lengths(n_arms: int, budget_steps: int, eta: int = 3) -> list[tuple[int, int]]:
    """``[(arms, cumulative steps per arm), ...]`` for successive halving within the budget.

    Rung k runs ``ceil(n / eta^k)`` arms up to ``s0 * eta^k`` steps each (arms continue, they
    do not restart), until one arm is left; ``s0`` is the largest that keeps the total within
    ``budget_steps``.
    """
    arms = [n_arms]
    while arms[-1] > 1:
        arms.append(max(1, math.ceil(arms[-1] / eta)))
    # cost = s0 * sum_k arms_k * (eta^k - eta^(k-1)), the first rung counted in full
    units = arms[0] + sum(a * (eta**k - eta ** (k - 1)) for k, a in enumerate(arms) if k > 0 and a > 0)
    last = len(arms) - 1 if arms[-1] == 1 and len(arms) > 1 else len(arms)
    # the final single arm needs no extra rung: it already won the previous one
    if last < len(arms):
        units -= arms[-1] * (eta**last - eta ** (last - 1))
        arms = arms[:last]
    s0 = max(1, budget_steps // max(units, 1))
    return [(a, s0 * eta**k) for k, a in enumerate(arms)]


def successive_halving(
    trainer: PilotTrainer,
    arms: Sequence[Arm],
    plan: Sequence[tuple[int, int]],
    *,
    metric_fn: Callable[[nn.Module], float] | None = None,
    exploit: bool = True,
    extrapolate_curve: bool = True,
) -> list[Arm]:
    """Race ``arms`` over the rungs of ``plan`` (:func:`rung_lengths`); returns them best first.

    With ``exploit`` every survivor restarts the next rung from the leader's weights, optimizer
    state and RNG state (the exploit step of population-based training, Jaderberg et al.,
    arXiv:1711.09846), on a fresh pass over the loader: later rungs compare the methods from
    the best point reached so far, nearer the end of training.

    Survivors of the last rung come first, by their last score, then the arms eliminated at
    later rungs before those eliminated earlier. An arm that has already trained some steps (the
    statistics run) continues from there.
    """
    alive = list(arms)
    for k, (n_run, end) in enumerate(plan):
        alive = alive[:n_run]
        for arm in alive:
            readings = run_rung(trainer, arm, end, metric_fn)
            arm.readings.append(readings)
            arm.scores.append(rung_score(readings, extrapolate_curve))
        # scores equal to 1e-6 (an arm whose clipping never bites trains exactly as the
        # baseline) keep the earlier, simpler arm ahead
        order = sorted(range(len(alive)), key=lambda i: (_tie(alive[i].scores[-1]), i))
        alive = [alive[i] for i in order]
        keep = plan[k + 1][0] if k + 1 < len(plan) else len(alive)
        for arm in alive[keep:]:
            arm.eliminated_at = k
        if exploit and k + 1 < len(plan):
            _restart_from_leader(alive[:keep])

    index = {id(a): i for i, a in enumerate(arms)}

    def rank(a: Arm) -> tuple[int, float, int]:
        rung = len(plan) if a.eliminated_at is None else a.eliminated_at
        return (-rung, _tie(a.scores[-1]) if a.scores else math.inf, index[id(a)])

    ranked = sorted(arms, key=rank)
    # Occam: no clipping unless clipping is measurably better. A baseline in the final rung
    # within BASELINE_TIE of the best score is the verdict.
    best = ranked[0].scores[-1] if ranked[0].scores else math.inf
    for i, a in enumerate(ranked):
        if a.eliminated_at is None and a.candidate.method == "none" and i > 0 and a.scores:
            s = a.scores[-1]
            if math.isfinite(best) and s <= best + BASELINE_TIE * abs(best):
                ranked.insert(0, ranked.pop(i))
            break
    return ranked


def paired_z(a: Arm, b: Arm, start: int, end: int) -> float | None:
    """Mean paired loss difference ``b - a`` over the last third of steps ``[start, end)``, in
    standard errors (positive: ``a`` is lower); ``None`` with fewer than 3 finite pairs."""
    la = np.asarray(a.losses[start:end], dtype=np.float64)
    lb = np.asarray(b.losses[start:end], dtype=np.float64)
    n = min(la.size, lb.size)
    if n < 3:
        return None
    k = max(3, n // 3)
    d = lb[n - k : n] - la[n - k : n]
    d = d[np.isfinite(d)]
    if d.size < 3:
        return None
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0:
        return math.inf if d.mean() > 0 else 0.0
    return float(d.mean()) / se


def _clearly_better(a: Arm, b: Arm, start: int, end: int) -> bool:
    sa, sb = a.scores[-1], b.scores[-1]
    if not math.isfinite(sb):
        return math.isfinite(sa)
    gap = (sb - sa) / abs(sb) if sb else 0.0
    z = paired_z(a, b, start, end)
    return gap >= OVERRULE_GAP and z is not None and z >= OVERRULE_Z


def _branch(trainer: PilotTrainer, leader: Arm, c: Candidate) -> Arm:
    """A new arm for candidate ``c`` starting from ``leader``'s weights, aligned with its step
    count (its earlier readings unknown: NaN)."""
    arm = trainer.branch(leader, c)
    arm.steps = leader.steps
    arm.losses = [math.nan] * leader.steps
    arm.padded = leader.steps
    return arm


def _restart_from_leader(alive: Sequence[Arm]) -> None:
    leader = alive[0]
    model_state = copy.deepcopy(leader.model.state_dict())
    opt_state = copy.deepcopy(leader.optimizer.state_dict())
    epoch = max(a.epoch for a in alive) + 1
    for arm in alive:
        if arm is not leader:
            arm.model.load_state_dict(model_state)
            arm.optimizer.load_state_dict(opt_state)
            arm.rng_state = leader.rng_state.clone()
        arm.batches = None
        arm.epoch = epoch
    leader.rng_state = leader.rng_state.clone()


def _tie(score: float) -> float:
    """``score`` rounded to 6 significant digits, so that float noise does not break ties."""
    if not math.isfinite(score) or score == 0:
        return score
    return float(f"{score:.6g}")


def staged_race(
    trainer: PilotTrainer,
    trunk: Arm,
    candidates: Sequence[Candidate],
    budget_steps: int,
    *,
    metric_fn: Callable[[nn.Module], float] | None = None,
    extrapolate_curve: bool = True,
    forbid_baseline: bool = False,
    prior: str | None = None,
    match_radius: bool = False,
    steps_left: int | None = None,
) -> tuple[list[Arm], list[tuple[int, int]]]:
    """Method first, then radius: two rungs of equal length within ``budget_steps``.

    Stage 1 races one arm per method (its middle radius) and the baseline, all branched from
    ``trunk``. Stage 2 races the winning method's three radii from the point its stage-1 arm
    reached (that arm continues; the other radii branch from it), so the radius, the finer
    choice, is judged nearer the end of training, where a small radius's lower noise shows.
    ``forbid_baseline`` keeps the baseline from winning stage 1 (see ``diagnose``). ``prior``,
    the method the statistics favour, keeps stage 1 unless another clipping method beats it
    clearly (:data:`OVERRULE_GAP` and :data:`OVERRULE_Z`); the baseline still wins a tie within
    :data:`BASELINE_TIE` of the best (no clipping unless clipping measurably helps).

    ``match_radius`` (``diagnose`` sets it for per-sample clipping under heavy-tailed noise)
    lets a smaller radius that catches up with stage 2's leader within the planned run take the
    verdict (:func:`matched_progress`); ``steps_left`` is the planned run's steps after the
    branch point.

    When the baseline wins stage 1, stage 2 instead repeats stage 1 over a second, later
    stretch (all arms restart from the baseline's point), so that a clipping method whose
    advantage shows late gets a second chance; the method the statistics favour (``prior``,
    else stage 1's best clipping method) races all its radii there, so that if it wins, its
    radius is chosen as in stage 2 (another clipping winner keeps its middle radius).

    Returns every arm, best first (stage-2 arms by their score, then stage-1 losers), and the
    rungs ``[(arms, cumulative steps), ...]``.
    """
    def _match(ranked: list[Arm], rung: int, end: int) -> None:
        # heavy-tailed per-sample noise: a smaller radius that catches up with the leader
        # within the planned run takes its place (matched_progress), in place
        if not (match_radius and steps_left is not None and ranked[0].candidate.method == "per_sample_clip"):
            return
        horizon = steps_left - end
        found = matched_progress(ranked, rung, horizon)
        if found is not None:
            arm, need = found
            arm.caught_up = (ranked[0].candidate.label, need, horizon)
            ranked.remove(arm)
            ranked.insert(0, arm)

    by_method: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_method.setdefault(c.method, []).append(c)
    first = [cs[len(cs) // 2] for cs in by_method.values()]
    clip = [cs for m, cs in by_method.items() if m != "none"]
    n_second = max((len(cs) for cs in clip), default=0)
    length = max(1, budget_steps // (len(first) + n_second))
    arms1 = [trainer.branch(trunk, c) for c in first]

    def stage1(arms: list[Arm], end: int, stretch: int) -> Arm:
        for arm in arms:
            readings = run_rung(trainer, arm, end, metric_fn)
            arm.readings.append(readings)
            arm.scores.append(rung_score(readings, extrapolate_curve))
        index = {id(a): i for i, a in enumerate(arms)}
        order = sorted(arms, key=lambda a: (_tie(a.scores[-1]), index[id(a)]))
        best = order[0]
        base = next((a for a in order if a.candidate.method == "none"), None)
        if base is not None and base is not best and math.isfinite(best.scores[-1]) and not forbid_baseline:
            if base.scores[-1] <= best.scores[-1] + BASELINE_TIE * abs(best.scores[-1]):
                best = base
        if prior is not None and best.candidate.method not in ("none", prior):
            # the statistics favour `prior` (heavy tails, spikes: properties of the whole run);
            # a short race is biased toward fast early progress, so it overrules them only with
            # a clear, significant margin
            held = next((a for a in order if a.candidate.method == prior and not a.diverged), None)
            if held is not None and not _clearly_better(best, held, end - stretch, end):
                best = held
        if best.candidate.method == "none" and forbid_baseline:
            best = next((a for a in order if a.candidate.method != "none" and not a.diverged), best)
        return best

    best = stage1(arms1, length, length)
    plan = [(len(arms1), length)]
    again, extra = 0, list[Candidate]()
    if best.candidate.method == "none" and len(arms1) > 1:
        # the baseline leads: stage 2 asks stage 1's question again over a second, later
        # stretch (every arm restarts from the baseline's point), and the method the
        # statistics favour (else stage 1's best clipping method) races all its radii there,
        # so that a clipping winner of the repeat still gets its radius chosen
        focus = prior if prior in by_method else min(
            (a for a in arms1 if a.candidate.method != "none"), key=lambda a: (_tie(a.scores[-1]), arms1.index(a))
        ).candidate.method
        extra = [c for c in by_method[focus] if c not in first]
        again = min(length, n_second * length // (len(arms1) + len(extra)))  # stage 2's share
        if again < 3:
            extra = []
            again = min(length, n_second * length // len(arms1))
    if again >= 3:
        arms_rep = list(arms1)
        arms_rep += [_branch(trainer, best, c) for c in extra]
        _restart_from_leader([best] + [a for a in arms_rep if a is not best])
        best = stage1(arms_rep, length + again, again)
        plan.append((len(arms_rep), length + again))
        ranked_rep = sorted(arms_rep, key=lambda a: (_tie(a.scores[-1]), arms_rep.index(a)))
        if best.candidate.method == focus and extra:
            # the radius among the focus method's arms, as in stage 2
            mine = [a for a in ranked_rep if a.candidate.method == focus]
            mine.remove(best)
            mine.insert(0, best)
            _match(mine, again, length + again)
            best = mine[0]
        order = [best] + [a for a in ranked_rep if a is not best]
        for a in order[1:]:
            a.eliminated_at = 1
        return order, plan
    order = [best] + [a for a in sorted(arms1, key=lambda a: (_tie(a.scores[-1]), arms1.index(a))) if a is not best]
    if best.candidate.method == "none" or len(by_method[best.candidate.method]) == 1:
        for a in order[1:]:
            a.eliminated_at = 0
        return order, plan
    # stage 2: the winner continues; its other radii branch from where it stands
    others = [c for c in by_method[best.candidate.method] if c != best.candidate]
    arms2 = [best] + [_branch(trainer, best, c) for c in others]
    for a in order[1:]:
        a.eliminated_at = 0
    _restart_from_leader(arms2)  # fresh pass: the same batches for every radius
    end = best.steps + length
    for arm in arms2:
        readings = run_rung(trainer, arm, end, metric_fn)
        arm.readings.append(readings)
        arm.scores.append(rung_score(readings, extrapolate_curve))
    plan.append((len(arms2), end))
    idx2 = {id(a): i for i, a in enumerate(arms2)}
    ranked2 = sorted(arms2, key=lambda a: (_tie(a.scores[-1]), idx2[id(a)]))
    _match(ranked2, length, end)
    return ranked2 + order[1:], plan
