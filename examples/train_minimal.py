"""Per-sample clipping on digits with flipped labels: the whole training loop, top to bottom.

A template to copy. A fifth of the training labels are flipped to a wrong class; clipping each
sample's gradient to norm ``clip`` (PS-Clip-SGD, Nobile & Grohs, arXiv:2605.02701) bounds how
far one wrong label can pull a step. Swap the method for ``rc.mean()`` (plain SGD with
momentum) or ``rc.clip_by_global_norm(clip)`` (Clip-SGD) to compare.

    python examples/train_minimal.py                 # about 10 s on a CPU
    python examples/train_minimal.py --epochs=5 --clip=0.5

``robustclip run label-noise`` runs this loop line for line, with checkpoints and exact resume
added at its edges (``src/robustclip/experiments/label_noise.py``).
"""

import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import robustclip as rc

# -- settings; override any of them on the command line, e.g. --epochs=5 --------------------------
label_noise = 0.2  # share of the training labels flipped to another class
epochs = 20
batch_size = 32
lr = 0.05  # SGD step size
momentum = 0.9
clip = 1.0  # radius c: no sample's gradient counts for more than this
seed = 0
for arg in sys.argv[1:]:
    key, value = arg.removeprefix("--").split("=")
    globals()[key] = type(globals()[key])(value)  # a KeyError names an unknown setting

# -- data: 8x8 images as 64-vectors in [0, 1]; a quarter held out, its labels left clean -----------
torch.manual_seed(seed)
digits = load_digits()
x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
perm = torch.randperm(len(x))
x_test, y_test, x_train, y_train = x[perm[:450]], y[perm[:450]], x[perm[450:]], y[perm[450:]]
flip = torch.rand(len(y_train)) < label_noise
y_train = torch.where(flip, (y_train + torch.randint(1, 10, y_train.shape)) % 10, y_train)

# -- model, optimizer and the clipper between them ----------------------------------------------------
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
clipper = rc.Clipper(model, optimizer, rc.per_sample_clip(clip))


@torch.no_grad()
def evaluate(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    model.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


# -- training ----------------------------------------------------------------------------------------
steps_per_epoch = len(x_train) // batch_size
loss_sum, clipped_sum = torch.zeros(()), torch.zeros(())  # summed where they live: no sync per step
for step in range(epochs * steps_per_epoch):
    epoch, b = divmod(step, steps_per_epoch)
    if b == 0:
        order = torch.randperm(len(x_train))  # a new sample order every epoch
    idx = order[b * batch_size : (b + 1) * batch_size]
    x, y = x_train[idx], y_train[idx]
    out = model(x)
    losses = F.cross_entropy(out, y, reduction="none")  # one loss per sample
    clipper.backward(losses)
    info = clipper.step()
    loss_sum += losses.detach().mean()
    if info.clipped_fraction is not None:  # the share of the batch's samples clipped (PS-Clip only)
        clipped_sum += info.clipped_fraction
    if (step + 1) % steps_per_epoch == 0:  # an epoch's end: evaluate and print
        test_loss, test_acc = evaluate(x_test, y_test)
        print(f"epoch {epoch + 1:3d}  train loss {loss_sum.item() / steps_per_epoch:.4f}  "
              f"clipped {clipped_sum.item() / steps_per_epoch:.2f}  test loss {test_loss:.4f}  "
              f"test acc {test_acc:.3f}")
        loss_sum.zero_()
        clipped_sum.zero_()

print(f"final test accuracy {test_acc:.3f} (chance: 0.100)")
