"""Hugging Face Trainer with per-sample clipping: a tiny GPT-2 (built from a config) learns
characters of the Python standard library's source. CPU, well under a minute.

    python examples/hf_trainer.py                       # PS-Clip-SGD
    python examples/hf_trainer.py --method global       # Clip-SGD on the Trainer's own loss
    python examples/hf_trainer.py --method micro --accumulation 4

Lines that differ from a plain Trainer script are marked ``# robustclip``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import robustclip as rc  # robustclip
from robustclip.experiments.data import CharCorpus, stdlib_corpus
from robustclip.integrations.transformers import RobustClipTrainer  # robustclip

METHODS = {
    "per_sample": lambda: rc.per_sample_clip(1.0),
    "micro": lambda: rc.micro_batch_clip(1.0),
    "global": lambda: rc.clip_by_global_norm(1.0),
    "spectral": lambda: rc.spectral_clip(0.05),
}


def windows(ids: torch.Tensor, block: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - block, (n,), generator=g).tolist()
    return [{"input_ids": ids[s : s + block], "labels": ids[s : s + block]} for s in starts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(METHODS), default="per_sample")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--accumulation", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(0)
    corpus = CharCorpus(stdlib_corpus(max_chars=200_000))
    block = 32
    config = GPT2Config(
        vocab_size=corpus.vocab_size, n_positions=block, n_embd=48, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    # the Trainer then averages the shifted labels (transformers 5.25 infers no loss type from
    # the name GPT2LMHeadModel); only batch-level methods use the Trainer's own loss
    model.loss_type = "ForCausalLM"
    train = windows(corpus.train, block, 4096, seed=1)
    val = windows(corpus.val, block, 256, seed=2)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps, learning_rate=3e-3, logging_steps=max(args.steps // 5, 1),
            report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
            per_device_eval_batch_size=64,
        )
        trainer = RobustClipTrainer(  # robustclip: instead of Trainer
            model=model, args=targs, train_dataset=train, eval_dataset=val,
            method=METHODS[args.method](),  # robustclip: the method
        )
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    last = [e for e in trainer.state.log_history if "robustclip/skipped_steps" in e][-1]
    readings = {k: round(v, 4) for k, v in last.items() if k.startswith("robustclip/") and "layer_norm" not in k}
    print(f"method {args.method}: validation loss {before:.3f} -> {after:.3f}")
    print(f"last logged readings: grad_norm {last['grad_norm']:.3f}, {readings}")


if __name__ == "__main__":
    main()
