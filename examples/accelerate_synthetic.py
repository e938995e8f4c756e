"""accelerate with robustclip on the synthetic heavy-tailed problem (robustclip.experiments.data), with
gradient accumulation. CPU, well under a minute; also runs under ``accelerate launch``.

    python examples/accelerate_synthetic.py                   # PS-Clip-SGD
    python examples/accelerate_synthetic.py --method global   # Clip-SGD on accelerator.backward

Lines that differ from a plain accelerate loop are marked ``# robustclip``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

import robustclip as rc  # robustclip
from robustclip.experiments.data import synthetic_classification


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["per_sample", "global"], default="per_sample")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    data = synthetic_classification(n_train=4000, n_test=1000, alpha=1.2, seed=0)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = nn.Sequential(nn.Linear(data.x_train.shape[1], 64), nn.ReLU(), nn.Linear(64, data.num_classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * 32)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True
    )
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    per_sample = args.method == "per_sample"
    method = rc.per_sample_clip(1.0) if per_sample else rc.clip_by_global_norm(1.0)
    clipper = rc.Clipper(model, None, method)  # robustclip: no optimizer, accelerate steps it

    for _ in range(args.epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                out = model(x)
                if per_sample:  # robustclip: the clipper computes the gradient
                    clipper.backward(F.cross_entropy(out, y, reduction="none"))
                else:
                    accelerator.backward(F.cross_entropy(out, y))
                if accelerator.sync_gradients:  # robustclip: finish the complete gradient
                    accelerator.unscale_gradients()  # robustclip (fp16: clip the true gradient)
                    info = clipper.finish()  # robustclip
                opt.step()  # a skipped step left p.grad None: this changes nothing
                if accelerator.sync_gradients and not info.skipped:  # robustclip
                    sched.step()
                opt.zero_grad()

    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    print(f"method {args.method}: test accuracy {acc:.3f}, skipped steps {clipper.skipped_steps}")
    print(f"last step: {info.as_dict()['grad_norm']:.3f} pre-clip norm")


if __name__ == "__main__":
    main()
