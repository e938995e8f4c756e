"""Small reference models used by the tests, benchmarks and experiments.

* :class:`MLP`: fully connected, ReLU.
* :class:`SmallCNN`: conv-pool blocks then fully connected layers (3x32x32 inputs by default).
* :class:`CharGPT`: a nanoGPT-style causal transformer over characters (Embedding, LayerNorm,
  Linear on 3-D inputs), with an optionally tied output head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
