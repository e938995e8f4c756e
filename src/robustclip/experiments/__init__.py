"""Built-in experiments that reproduce the papers' claims, and the helpers they share.

Each experiment is one plain module, readable top to bottom: a ``Config`` dataclass (every
hyperparameter with its default), ``run(cfg, ctx)`` (its training loops, written out in the
shape of ``examples/train_minimal.py``, with the run directory's checkpoints at their edges)
and ``plot(runs, out_dir)``. Some also build a :class:`Problem` (model + data + per-sample loss) that other
tools, such as ``robustclip diagnose``, reuse through :func:`load_problem`.

==================  ==========================================================================
name                what it reproduces
==================  ==========================================================================
demo                SGDM, Clip-SGD, NSGD, PS-Clip-SGD (Spectral) on two embedded problems
synthetic-noise     PS-Clip paper Figs. 1-2: NSGD vs Clip-SGD vs PS-Clip-SGD under heavy tails
label-noise         digits with flipped labels: SGDM vs Clip-SGD vs PS-Clip-SGD, equal time
accumulation        char-level GPT: clip each micro-batch vs clip after accumulation vs none
spectral-mlp        spectral paper: MLP on x0*x1*x2 with rank-1 heavy-tailed gradient noise
sgc                 over-parameterization paper: rho-hat per epoch, largest stable step size
cifar100-alexnet    PS-Clip paper Fig. 3 (needs the CIFAR-100 files)
cifar10-resnet18    over-parameterization paper (needs the CIFAR-10 files)
cifar10-spectral    spectral clipping on CIFAR-10 (needs the CIFAR-10 files)
==================  ==========================================================================
"""

from __future__ import annotations

from robustclip.experiments._problem import Problem
from robustclip.experiments._registry import (
    describe,
    get_experiment,
    list_experiments,
    load_problem,
    make_config,
)
from robustclip.experiments._run import load_final_state, load_run
from robustclip.experiments._runner import plot_runs, run_experiment

__all__ = [
    "Problem", "describe", "get_experiment", "list_experiments", "load_final_state", "load_problem", "load_run",
    "make_config", "plot_runs", "run_experiment",
]
