"""CIFAR experiments: cifar100-alexnet, cifar10-resnet18 and cifar10-spectral.

* ``cifar100-alexnet`` -- Nobile & Grohs, "Robust and Fast Training via Per-Sample Clipping"
  (arXiv:2605.02701), Fig. 3: AlexNet on CIFAR-100 with momentum, SGD vs Clip-SGD vs
  PS-Clip-SGD; training and validation accuracy, and per epoch the average per-sample gradient
  norm and the share of clipped samples.
* ``cifar10-resnet18`` -- Lobanov & Koloskova (arXiv:2605.14800): ResNet-18 on CIFAR-10 with
  SGD, ClipSGD and NSGD.
* ``cifar10-spectral`` -- Yukhimchuk et al. (arXiv:2605.11838): ResNet-18 on CIFAR-10, SGD with
  momentum vs norm clipping vs spectral clipping (``tau = 1``, rank 10). As in the paper's runs
  (their airbench94 code), the loss is summed over the batch of 2000 (``loss_reduction=sum``), and
  norm and spectral clipping act on the convolution filters only (``clip_params=conv``); the step
  size and weight decay are rescaled so that the unclipped step equals a mean-loss step of lr 0.1.

The data are the standard python-format CIFAR files, read from ``data_dir`` (the
``cifar-10-batches-py``/``cifar-100-python`` folders or their ``.tar.gz`` archives); nothing is
downloaded. The experiment's name picks the defaults (``dataset``, model, methods, step sizes);
every one is a config field. ResNet-18 uses GroupNorm by default so that per-sample gradients
are defined (set ``norm=batch`` for the original with methods that do not need them; the config
refuses it with PS-Clip-SGD). Training runs on the GPU when there is one, loads batches with
``workers`` processes, and with ``amp=true`` uses bfloat16 autocast (bfloat16 only: float16
would need loss scaling, which the per-sample norms and radii would see; a GPU without bfloat16
is refused before the run starts). Augmentation (4-pixel padded random crop, horizontal flip) is drawn from a
generator seeded by (seed, epoch, sample), so any number of workers and a resumed run give the
same images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import robustclip as rc
from robustclip.experiments._methods import (
    METHODS,
    MethodParams,
    build_method,
    check_methods,
    step_size,
)
from robustclip.experiments._plot import Panel, curves, save_panels
from robustclip.experiments._problem import Problem
from robustclip.experiments._run import (
    RunContext,
    RunData,
    method_table,
    resolve_device,
    seed_everything,
)
from robustclip.experiments._train import (
    EpochMeter,
    autocast,
    check_amp,
    epoch_permutation,
    evaluation,
    step_reading,
    steps_with_batches,
)
from robustclip.experiments.data import Split, find_cifar, load_cifar, normalize_images
from robustclip.experiments.models import AlexNet, ResNet18, SmallCNN

DESCRIPTIONS = {
    "cifar100-alexnet": "PS-Clip paper Fig. 3: AlexNet on CIFAR-100, SGDM vs Clip-SGD vs PS-Clip-SGD (needs the data)",
    "cifar10-resnet18": "over-parameterization paper: ResNet-18 (GroupNorm) on CIFAR-10, SGD vs Clip-SGD vs NSGD (needs the data)",
    "cifar10-spectral": "spectral paper: ResNet-18 on CIFAR-10, SGDM vs Clip-SGD vs Spectral (needs the data)",
}
DESCRIPTION = "CIFAR experiments (see DESCRIPTIONS)"


@dataclass
class Config:
    dataset: str = "cifar100"  # "cifar10" or "cifar100" (each experiment's name sets its own)
    data_dir: str = "data"  # holds cifar-10-batches-py / cifar-100-python or their .tar.gz
    model: str = "alexnet"  # "alexnet", "resnet18" or "smallcnn"
    norm: str = "group"  # ResNet-18's normalisation: "group" (per-sample safe) or "batch"
    width: int = 64  # ResNet-18's first-stage channels
    alexnet_hidden: int = 4096  # AlexNet's fully connected width
    methods: tuple[str, ...] = ("SGDM", "Clip-SGD", "PS-Clip-SGD")
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.01
    nsgd_lr: float = 0.0  # NSGD's step size (0: lr * clip, a clipped step's length)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cosine: bool = True  # cosine decay of the step size to 0
    clip: float = 1.0  # radius c of Clip-SGD and PS-Clip-SGD
    tau: float = 1.0  # spectral clipping's threshold
    rank: int = 10  # spectral clipping's rank (0: exact SVD)
    # "sum": the gradient of the loss summed over the batch (batch size x the mean's), before any
    # clipping, as in the spectral paper; "mean": the mean loss
    loss_reduction: str = "mean"
    # which parameters Clip-SGD, NSGD and Spectral clip: "all" (Spectral: its default selection)
    # or "conv" (the 4-D convolution filters only, as in the spectral paper)
    clip_params: str = "all"
    augment: bool = True
    workers: int = 2  # DataLoader worker processes (0: load in the main process)
    amp: bool = False  # bfloat16 autocast (GPUs without bfloat16 are refused)
    limit_train: int = 0  # use only the first N training images (0: all)
    limit_test: int = 0  # use only the first N test images (0: all)
    log_every: int = 50  # steps between step records
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        check_methods(self.methods)
        if self.dataset not in ("cifar10", "cifar100"):
            raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {self.dataset!r}.")
        if self.model not in ("alexnet", "resnet18", "smallcnn"):
            raise ValueError(f"model must be 'alexnet', 'resnet18' or 'smallcnn', got {self.model!r}.")
        if self.norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {self.norm!r}.")
        per_sample = [m for m in self.methods if METHODS[m].per_sample]
        if self.model == "resnet18" and self.norm == "batch" and per_sample:
            raise ValueError(
                f"norm=batch cannot train {per_sample}: BatchNorm mixes the samples of a batch, so "
                "per-sample gradients are not defined; use norm=group (the default) or drop them."
            )
        if self.nsgd_lr < 0:
            raise ValueError(f"nsgd_lr must be >= 0 (0: lr * clip), got {self.nsgd_lr}.")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}.")
        if self.clip_params not in CLIP_PARAMS:
            raise ValueError(f"clip_params must be one of {list(CLIP_PARAMS)}, got {self.clip_params!r}.")
        if self.clip_params == "conv":
            sample_level = [m for m in self.methods if m not in _SELECTABLE]
            if sample_level:
                raise ValueError(
                    f"clip_params=conv restricts batch-level clipping to the convolution filters, but "
                    f"{sample_level} clip before the batch mean and cannot be restricted; use "
                    f"clip_params=all or methods from {list(_SELECTABLE)}."
                )
        for k in ("width", "alexnet_hidden", "epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}.")
        for k in ("workers", "limit_train", "limit_test", "log_every", "rank"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}.")


def default_config(name: str) -> Config:
    """The defaults of each CIFAR experiment."""
    if name == "cifar100-alexnet":
        return Config(dataset="cifar100")
    if name == "cifar10-resnet18":
        return Config(
            dataset="cifar10", model="resnet18", methods=("SGD", "Clip-SGD", "NSGD"), epochs=50,
            lr=0.1, momentum=0.0, clip=5.0,
        )
    if name == "cifar10-spectral":
        # the summed loss of batch 2000 makes the gradient 2000x the mean's: lr and weight decay
        # are rescaled (lr 0.1 / 2000, wd 5e-4 * 2000) so that an unclipped step and the decay per
        # step equal those of a mean-loss run at lr 0.1, while c = 1 and tau = 1 see the paper's scale
        b = 2000
        return Config(
            dataset="cifar10", model="resnet18", methods=("SGDM", "Clip-SGD", "Spectral"), epochs=30,
            batch_size=b, lr=0.1 / b, weight_decay=5e-4 * b, clip=1.0, tau=1.0, rank=10,
            loss_reduction="sum", clip_params="conv",
        )
    raise ValueError(f"unknown CIFAR experiment {name!r}; choose from {list(DESCRIPTIONS)}.")


def preflight(cfg: Config) -> None:
    """Fail before a run directory is made: missing data (saying where to put the files), and
    ``amp`` on a GPU without bfloat16."""
    find_cifar(cfg.dataset, cfg.data_dir)
    if cfg.amp:
        check_amp(resolve_device(cfg.device))


def load(cfg: Config) -> Split:
    split = load_cifar(cfg.dataset, cfg.data_dir)
    if cfg.limit_train:
        split.x_train, split.y_train = split.x_train[: cfg.limit_train], split.y_train[: cfg.limit_train]
    if cfg.limit_test:
        split.x_test, split.y_test = split.x_test[: cfg.limit_test], split.y_test[: cfg.limit_test]
    return split


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    if cfg.model == "alexnet":
        return AlexNet(num_classes, hidden=cfg.alexnet_hidden)
    if cfg.model == "resnet18":
        return ResNet18(num_classes, norm=cfg.norm, width=cfg.width)
    return SmallCNN(num_classes=num_classes, norm="group")


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


LOSS_REDUCTIONS = ("mean", "sum")
CLIP_PARAMS = ("all", "conv")
#: the methods whose clipping ``clip_params=conv`` can restrict (SGD/SGDM clip nothing)
_SELECTABLE = ("SGD", "SGDM", "Clip-SGD", "NSGD", "Spectral")


def is_conv_filter(param: Tensor) -> bool:
    """A 4-D weight ``(out, in, kh, kw)``: the filters the spectral paper's CIFAR runs clip."""
    return param.dim() == 4


class SumOverBatch(rc.GradientTransform):
    """Multiply the mean gradient by the number of samples: the gradient of the loss summed
    over the batch (``reduction="sum"``), for the clipping that follows to see that scale."""

    name = "sum_loss"

    def update(self, grads: list[Tensor], state: Any, ctx: rc.StepContext) -> tuple[list[Tensor], Any]:
        if ctx.num_samples is None:
            raise ValueError("SumOverBatch needs the step's sample count; run it inside rc.Clipper.")
        torch._foreach_mul_(grads, ctx.num_samples.to(grads[0].dtype))
        return grads, state


class OnlyParams(rc.GradientTransform):
    """Run a batch-level transform on the gradients ``keep(grad)`` picks; leave the others
    unchanged (the spectral paper norm-clips only the convolution filters)."""

    def __init__(self, inner: rc.GradientTransform, keep: Callable[[Tensor], bool]) -> None:
        self.inner, self.keep = inner, keep
        self.name = inner.name

    def _picked(self, tensors: Sequence[Tensor]) -> list[int]:
        idx = [i for i, t in enumerate(tensors) if self.keep(t)]
        if not idx:
            raise ValueError(f"{self.inner!r} restricted to the parameters {self.keep.__name__} picks, but it picks none.")
        return idx

    def init(self, params: Sequence[Tensor]) -> Any:
        return self.inner.init([params[i] for i in self._picked(params)])

    def update(self, grads: list[Tensor], state: Any, ctx: rc.StepContext) -> tuple[list[Tensor], Any]:
        idx = self._picked(grads)

        def sub(xs: Sequence[Any]) -> list[Any]:
            return [xs[i] for i in idx] if xs else []

        inner_ctx = rc.StepContext(sub(ctx.params), sub(ctx.names), ctx.loss, ctx.num_samples, sub(ctx.modules))
        new, state = self.inner.update([grads[i] for i in idx], state, inner_ctx)
        for i, g in zip(idx, new):
            grads[i] = g
        return grads, state

    def readings(self, state: Any) -> dict[str, Any]:
        return self.inner.readings(state)

    def state_to_dict(self, state: Any) -> Any:
        return self.inner.state_to_dict(state)

    def state_from_dict(self, template: Any, data: Any) -> Any:
        return self.inner.state_from_dict(template, data)

    def __repr__(self) -> str:
        return f"only({self.keep.__name__}, {self.inner!r})"


def build_arm_method(cfg: Config, method: str) -> Any:
    """The robustclip method of one arm, with the config's loss scaling and parameter selection."""
    conv = cfg.clip_params == "conv"
    params = MethodParams(
        clip=cfg.clip, tau=cfg.tau, rank=cfg.rank,
        spectral_select=(lambda name, p, module: is_conv_filter(p)) if conv else None,
    )
    base = build_method(method, params)
    if conv and method in ("Clip-SGD", "NSGD"):
        base = OnlyParams(base, is_conv_filter)
    if cfg.loss_reduction == "sum":
        # first in the chain: every clipping rule sees the summed gradient
        return rc.chain(SumOverBatch(), base) if isinstance(base, rc.GradientTransform) else rc.chain(base, SumOverBatch())
    return base


class AugmentedCIFAR(Dataset):
    """uint8 images -> normalised float tensors, with per-(seed, epoch, index) augmentation."""

    def __init__(self, x: Tensor, y: Tensor, augment: bool, seed: int) -> None:
        self.x, self.y, self.augment, self.seed = x, y, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.x[i]
        if self.augment:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
            dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
            flip = bool(torch.randint(0, 2, (), generator=g))
            img = F.pad(img, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if flip:
                img = img.flip(2)
        return img, self.y[i]


class _Batches(torch.utils.data.Sampler):
    def __init__(self, order: Tensor, batch_size: int, start: int) -> None:
        self.order, self.batch_size, self.start = order, batch_size, start

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, len(self)):
            yield self.order[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.order.numel() // self.batch_size


class LoaderBatches:
    """Mini-batches through a DataLoader; epoch ``e`` is the same whatever the workers."""

    def __init__(self, ds: AugmentedCIFAR, batch_size: int, workers: int, device: torch.device) -> None:
        if batch_size > len(ds):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(ds)} training images.")
        self.ds, self.batch_size, self.workers, self.device = ds, batch_size, workers, device
        self.steps_per_epoch = len(ds) // batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self.ds.epoch = epoch  # workers start per epoch and copy the dataset with this value
        order = epoch_permutation(len(self.ds), self.ds.seed, epoch)
        loader = DataLoader(
            self.ds, batch_sampler=_Batches(order, self.batch_size, start), num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in loader:
            yield normalize_images(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)


def problem(cfg: Config) -> Problem:
    split = load(cfg)
    torch.manual_seed(cfg.seed)
    return Problem(
        f"{cfg.dataset}-{cfg.model}", build_model(cfg, split.num_classes),
        (normalize_images(split.x_train), split.y_train), (normalize_images(split.x_test), split.y_test),
        _loss, cfg.batch_size, cfg.lr, cfg.momentum,
    )


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    split = load(cfg)
    ctx.note(f"{cfg.dataset}: {len(split.x_train)} training, {len(split.x_test)} test images; device {device}")
    ds = AugmentedCIFAR(split.x_train, split.y_train, cfg.augment, cfg.seed)
    test = (normalize_images(split.x_test), split.y_test)
    for method in ctx.iterate(list(cfg.methods), "methods"):
        arm_id = method
        if ctx.is_done(arm_id):
            continue
        lr = step_size(method, cfg.lr, cfg.clip, cfg.nsgd_lr)
        tag = {"arm": arm_id, "method": method, "lr": lr}
        batches = LoaderBatches(ds, cfg.batch_size, cfg.workers, device)
        total = cfg.epochs * batches.steps_per_epoch
        seed_everything(cfg.seed)
        model = build_model(cfg, split.num_classes).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.cosine:  # decay the step size to 0 over the run
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
        else:  # a constant step size
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        method_fn = build_arm_method(cfg, method)
        with rc.Clipper(model, optimizer, method_fn) as clipper:
            meter = EpochMeter(device)
            arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                                   "clipper": clipper, "meter": meter})
            steps_per_epoch = batches.steps_per_epoch
            meter.start_clock()
            for step, x, y in steps_with_batches(arm, batches, total, arm_id):
                with autocast(device, cfg.amp):
                    out = model(x)
                out = out.float()  # per-sample losses and norms in float32
                clipper.backward(_loss(out, y))
                info = clipper.step()
                scheduler.step()
                meter.add(info, out, y)
                if cfg.log_every and (step + 1) % cfg.log_every == 0:
                    ctx.log({**tag, "kind": "step", "step": step + 1, **step_reading(info)})
                if (step + 1) % steps_per_epoch == 0:
                    epoch = (step + 1) // steps_per_epoch
                    readings = meter.read(step + 1)
                    ctx.log({**tag, "kind": "epoch", "epoch": epoch, **readings,
                             **evaluation(model, _loss, device, amp=cfg.amp, batch_size=500, test=test)})
                    meter.start_clock()
            arm.finish()
    return summarize(ctx.records, cfg.methods)


def summarize(records: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    out = {}
    for m in methods:
        rs = [r for r in records if r.get("method") == m and r.get("kind") == "epoch"]
        if rs:
            out[m] = {
                "final_test_acc": rs[-1]["test_acc"],
                "best_test_acc": max(r["test_acc"] for r in rs),
                "final_batch_loss": rs[-1]["batch_loss"],
                "time_s": rs[-1]["time"],
                "epochs": rs[-1]["epoch"],
            }
    return {"methods": out}


def format_summary(summary: dict[str, Any]) -> str:
    return method_table(
        summary["methods"],
        14,
        [
            ("final test acc", "final_test_acc", ">15.4f", ""),
            ("best test acc", "best_test_acc", ">15.4f", ""),
            ("time", "time_s", ">9.1f", "s"),
        ],
    )


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    name = runs[0].experiment.replace("-", "_")
    panels = [
        Panel("test accuracy", "epoch", "accuracy", curves(runs, "test_acc")),
        Panel("training accuracy (mini-batches)", "epoch", "accuracy", curves(runs, "batch_acc")),
        Panel("training loss (mini-batches)", "epoch", "loss", curves(runs, "batch_loss"), logy=True),
        Panel("mean per-sample gradient norm", "epoch", "norm", curves(runs, "ps_norm_mean"), logy=True),
        Panel("fraction clipped", "epoch", "fraction", curves(runs, "clipped_fraction")),
        Panel("test accuracy vs time", "training time (s)", "accuracy", curves(runs, "test_acc", x="time", by="epoch")),
    ]
    return [save_panels(out_dir / f"{name}.png", panels, runs[0].experiment)]
