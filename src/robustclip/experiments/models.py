"""Small reference models used by the tests, benchmarks and experiments.

* :class:`MLP`: fully connected, ReLU.
* :class:`SmallCNN`: conv-pool blocks then fully connected layers (3x32x32 inputs by default).
* :class:`AlexNet`, :class:`ResNet18`: CIFAR-size (32x32) versions; ResNet-18 with BatchNorm or
  GroupNorm (for per-sample methods).
* :class:`CharGPT`: a nanoGPT-style causal transformer over characters (Embedding, LayerNorm,
  Linear on 3-D inputs), with an optionally tied output head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "AlexNet", "CharGPT", "ResNet18", "SmallCNN", "sequence_losses"]


class MLP(nn.Sequential):
    """``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with ReLU between linear layers."""

    def __init__(self, sizes: Sequence[int], bias: bool = True, inplace: bool = False) -> None:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU(inplace=inplace))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """conv(c1)-pool, conv(c2)-pool, ..., then ``fc -> ReLU -> fc``.

    The defaults are the benchmark CNN: conv32-pool, conv64-pool, conv128-pool, fc256, fc100 on
    3x32x32 inputs.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        num_classes: int = 100,
        image_size: int = 32,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c = in_channels
        for out in channels:
            blocks.append(nn.Conv2d(c, out, 3, padding=1))
            if norm == "group":
                blocks.append(nn.GroupNorm(min(8, out), out))
            elif norm == "batch":
                blocks.append(nn.BatchNorm2d(out))
            blocks += [nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*blocks)
        side = image_size // (2 ** len(channels))
        self.fc1 = nn.Linear(c * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}.")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """A character-level GPT: token + position embeddings, pre-LN blocks, a linear head.

    Args:
        vocab: number of characters.
        block_size: the longest context ``T``.
        d: embedding width; ``heads`` must divide it.
        layers: number of transformer blocks.
        tied: share the token embedding with the output head (as GPT-2 does).
    """

    def __init__(
        self,
        vocab: int = 96,
        block_size: int = 128,
        d: int = 128,
        layers: int = 4,
        heads: int = 4,
        tied: bool = False,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        for n, p in self.named_parameters():
            if n.endswith("proj.weight") or n.endswith("out.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}.")
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def sequence_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample loss of a sequence model: the mean token cross-entropy of each sequence."""
    b = logits.shape[0]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return tok.view(b, -1).mean(1)


# -- CIFAR models (32x32 inputs) -----------------------------------------------------------------


def _norm2d(kind: str, channels: int) -> nn.Module:
    """BatchNorm (``"batch"``), GroupNorm with up to 32 groups (``"group"``) or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}.")


class AlexNet(nn.Module):
    """AlexNet (torchvision's layer widths) adapted to 32x32 inputs.

    The five conv layers keep torchvision's channels (64, 192, 384, 256, 256); the first uses a
    3x3 kernel with stride 1 and the three max-pools halve the side 32 -> 16 -> 8 -> 4, so the
    classifier sees ``256 x 4 x 4`` features (torchvision's 11x11/stride-4 stem and adaptive
    pool assume 224x224 images). The PS-Clip-SGD paper trains this architecture on CIFAR-100
    (Nobile & Grohs, arXiv:2605.02701, Fig. 3).

    Args:
        num_classes: outputs.
        dropout: dropout before the hidden fully connected layers (torchvision: 0.5; here 0
            by default, the setting of the experiments). Dropout works with PS-Clip-SGD's
            default hook engine (and the loop engine): they reuse the batch's own forward pass,
            so each sample's gradient carries the mask that sample saw. The vmap engine refuses
            it: it re-runs the forward pass and would draw new masks.
        hidden: width of the two hidden fully connected layers (torchvision: 4096).
    """

    def __init__(self, num_classes: int = 100, dropout: float = 0.0, hidden: int = 4096) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        layers: list[nn.Module] = []
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(256 * 4 * 4, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a shortcut (a 1x1 convolution when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.n2 = _norm2d(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm2d(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al., arXiv:1512.03385; the usual CIFAR variant).

    A 3x3 stem without max-pool, then four stages of two basic blocks (64, 128, 256, 512
    channels; stride 2 from the second stage), global average pooling and a linear head.

    Args:
        num_classes: outputs.
        norm: ``"batch"`` (the original), ``"group"`` (GroupNorm: normalises within a sample, so
            per-sample gradients are defined, as per-sample clipping needs) or ``"none"``.
        width: channels of the first stage (64 in the original; smaller for quick runs).
    """

    def __init__(self, num_classes: int = 10, norm: str = "batch", width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), _norm2d(norm, width), nn.ReLU())
        blocks: list[nn.Module] = []
        c = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            for j in range(2):
                blocks.append(BasicBlock(c, out, 2 if (i > 0 and j == 0) else 1, norm))
                c = out
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
