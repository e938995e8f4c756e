"""Hugging Face Trainer with robustclip: the same parameters as robustclip's own loop, readings in
the logs, a skipped step that touches nothing, and one optimizer step per step."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import robustclip as rc
from robustclip import losses as L

transformers = pytest.importorskip("transformers")
from robustclip.integrations.transformers import RobustClipTrainer  # noqa: E402

VOCAB, SEQ, BATCH, STEPS = 32, 8, 4, 20


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    # named, so that the Trainer counts the shifted labels when it averages tokens (transformers
    # 5.25 infers no loss type from the name GPT2LMHeadModel and then divides the summed token
    # losses by every label, position 0 included: a gradient (T-1)/T too small)
    model.loss_type = "ForCausalLM"
    return model


def dataset(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    ids[:5, 3] = VOCAB - 1  # a few rare tokens: larger per-sample gradients
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def make_opt(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
    return opt, sched


class Recording(RobustClipTrainer):
    """Records each micro-batch the Trainer trains on, to replay it in robustclip's own loop."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)


def run_trainer(tmp_path, method, accumulation=1, callbacks=(), model=None, **kw):
    model = model if model is not None else tiny_gpt2()
    opt, sched = make_opt(model)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS,
        gradient_accumulation_steps=accumulation, logging_steps=5, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_grad_norm=0.0,
    )
    trainer = Recording(
        model=model, args=args, train_dataset=dataset(), optimizers=(opt, sched),
        method=method, callbacks=list(callbacks), **kw,
    )
    trainer.batches = []
    trainer.train()
    return trainer, model, opt, sched, calls


def own_loop(batches, method, accumulation):
    model = tiny_gpt2()
    opt, sched = make_opt(model)
    clipper = rc.Clipper(model, opt, method)
    for s in range(0, len(batches), accumulation):
        for ids in batches[s : s + accumulation]:
            clipper.backward(L.causal_lm(model(input_ids=ids).logits, ids))
        clipper.step()
        sched.step()
    return model


METHODS = {
    "per_sample_clip": (lambda: rc.per_sample_clip(0.5), 1),
    "micro_batch_clip": (lambda: rc.micro_batch_clip(0.5), 2),
    "clip_by_global_norm": (lambda: rc.clip_by_global_norm(0.5), 1),
    "spectral_clip": (lambda: rc.spectral_clip(0.05, rank=None), 1),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_trainer_equals_own_loop_and_logs_readings(tmp_path, name):
    make, accumulation = METHODS[name]
    trainer, model, _, sched, calls = run_trainer(tmp_path, make(), accumulation)
    assert len(trainer.batches) == STEPS * accumulation
    assert len(calls) == STEPS  # the optimizer stepped exactly once per step
    assert sched.last_epoch == STEPS
    ref = own_loop(trainer.batches, make(), accumulation)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    # the method changed something: training is not a no-op
    start = tiny_gpt2()
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), start.parameters())) > 1e-3
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_loss" not in entry]
    assert len(logs) == STEPS // 5
    for entry in logs:
        assert entry["robustclip/skipped_steps"] == 0.0
        assert math.isfinite(entry["grad_norm"]) and entry["grad_norm"] > 0
        assert entry["robustclip/grad_norm"] == pytest.approx(entry["grad_norm"])
        layer = [k for k in entry if k.startswith("robustclip/layer_norm/")]
        assert "robustclip/layer_norm/transformer.h.0.attn.c_attn" in layer
        # the per-layer norms make up the global norm before clipping
        assert math.sqrt(sum(entry[k] ** 2 for k in layer)) == pytest.approx(entry["grad_norm"], rel=1e-4)
        if name in ("per_sample_clip", "micro_batch_clip"):
            assert 0.0 <= entry["robustclip/clipped_fraction"] <= 1.0
        if name == "clip_by_global_norm":
            assert entry["robustclip/clip_by_global_norm/radius"] == pytest.approx(0.5)
            assert 0.0 <= entry["robustclip/clip_by_global_norm/clipped"] <= 1.0
    if name == "per_sample_clip":  # the radius is small enough that some samples were clipped
        assert max(e["robustclip/clipped_fraction"] for e in logs) > 0
    # the norm logged is the one before clipping: above the radius when clip_by_global_norm clipped
    if name == "clip_by_global_norm":
        assert any(e["grad_norm"] > 0.5 for e in logs)


class Poison(transformers.TrainerCallback):
    """Makes step ``at`` produce NaN (through a forward hook on the embedding) and checks that
    the step changed nothing: parameters, optimizer state, scheduler step count."""

    def __init__(self, model, opt, sched, at):
        self.model, self.opt, self.sched, self.at = model, opt, sched, at
        self.active = False
        self.checked = False
        model.transformer.wte.register_forward_hook(
            lambda m, i, out: out * math.nan if self.active else None
        )

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            self.active = True
            self.params = copy.deepcopy(self.model.state_dict())
            self.opt_state = copy.deepcopy(self.opt.state_dict())
            self.sched_steps = (self.sched.last_epoch, self.sched._step_count)

    def on_step_end(self, args, state, control, **kw):
        if self.active:
            self.active = False
            for k, v in self.model.state_dict().items():
                assert torch.equal(v, self.params[k]), k
            after = self.opt.state_dict()["state"]
            assert after.keys() == self.opt_state["state"].keys()
            for pid, st in self.opt_state["state"].items():
                for k, v in st.items():
                    assert torch.equal(after[pid][k], v)
            assert (self.sched.last_epoch, self.sched._step_count) == self.sched_steps
            self.checked = True


@pytest.mark.parametrize("method", [rc.per_sample_clip(0.5), rc.clip_by_global_norm(0.5)], ids=["per_sample", "global"])
def test_a_nonfinite_step_changes_nothing_under_the_trainer(tmp_path, method, caplog):
    model = tiny_gpt2()
    opt, sched = make_opt(model)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    poison = Poison(model, opt, sched, at=3)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=6, logging_steps=2,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_grad_norm=0.0,
        logging_nan_inf_filter=False,
    )
    trainer = RobustClipTrainer(
        model=model, args=args, train_dataset=dataset(), optimizers=(opt, sched), method=method,
        callbacks=[poison],
    )
    trainer.train()
    assert poison.checked
    assert len(calls) == 5 and sched.last_epoch == 5  # six steps, one skipped
    assert trainer.clipper.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    skips = [e["robustclip/skipped_steps"] for e in trainer.state.log_history if "robustclip/skipped_steps" in e]
    assert skips == [0.0, 1.0, 1.0]


def test_max_grad_norm_is_turned_off_with_a_warning(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_grad_norm=3.0, report_to="none", use_cpu=True)
    with pytest.warns(UserWarning, match="max_grad_norm=3.0 is ignored"):
        trainer = RobustClipTrainer(model=tiny_gpt2(), args=args, train_dataset=dataset(), method=rc.mean())
    assert trainer.args.max_grad_norm == 0.0
    # the default (1.0) is turned off without a warning
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = RobustClipTrainer(model=tiny_gpt2(), args=args, train_dataset=dataset(), method=rc.mean())
    assert trainer.args.max_grad_norm == 0.0


@pytest.mark.parametrize("method", [rc.per_sample_clip(1.0), rc.clip_by_global_norm(1.0)], ids=["per_sample", "global"])
def test_the_trainers_own_optimizer_and_scheduler(tmp_path, method):
    """Built by the Trainer (AdamW, linear schedule): stepped once per step, no warning."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, warmup_steps=1, logging_steps=1,
    )
    model = tiny_gpt2()
    trainer = RobustClipTrainer(model=model, args=args, train_dataset=dataset(), method=method)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.lr_scheduler.last_epoch == 3
    assert all(len(st) and int(st["step"]) == 3 for st in trainer.optimizer.state.values())
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_checkpoints_carry_the_clippers_state(tmp_path):
    """An adaptive radius (an EMA of past norms) resumes where it was: the third step of a
    resumed run uses the radius of the third step of an uninterrupted run."""
    from robustclip import thresholds as th
    from robustclip.integrations.transformers import CLIPPER_STATE

    def trainer_for(steps, out):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=2,
            report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        )
        return RobustClipTrainer(model=tiny_gpt2(), args=args, train_dataset=dataset(), method=rc.clip_by_global_norm(th.EMA()))

    trainer_for(2, tmp_path / "a").train()
    assert (tmp_path / "a" / "checkpoint-2" / CLIPPER_STATE).is_file()
    resumed = trainer_for(3, tmp_path / "a")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    whole = trainer_for(3, tmp_path / "b")
    whole.train()
    assert resumed.clipper.steps == whole.clipper.steps == 3
    radius = [t.clipper.last.transforms["clip_by_global_norm"]["radius"] for t in (resumed, whole)]
    assert torch.isfinite(radius[1]) and float(radius[1]) > 0
    torch.testing.assert_close(radius[0], radius[1])
    # train() again on the same trainer: the Trainer keeps its optimizer, and the clipper goes on
    # with it
    old = whole.clipper
    whole.train()
    assert whole.clipper is old and whole.clipper.steps == 6
    assert all(int(st["step"]) == 6 for st in whole.optimizer.state.values())


def test_a_batch_without_labels_says_what_to_pass(tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    data = [{"input_ids": d["input_ids"]} for d in dataset(4)]
    trainer = RobustClipTrainer(model=tiny_gpt2(), args=args, train_dataset=data, method=rc.per_sample_clip(1.0))
    with pytest.raises(ValueError, match="per_sample_loss"):
        trainer.train()
