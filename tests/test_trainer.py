"""Training loop: packing == padding, accumulation normalization, exact resume, atomic
checkpoints, NaN guard, early stopping, schedules, and a golden loss curve."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from qkern_train import data as D
from qkern_train.checkpoint import load_model, save_model
from qkern_train.config import ConfigError, OutputSection, TrainConfig, TrainSection
from qkern_train.lora import LoraConfig, adapted_modules, apply_lora
from qkern_train.model import ModelConfig, build_model
from qkern_train.trainer import (
    Trainer,
    TrainingDiverged,
    latest_checkpoint,
    list_checkpoints,
    lr_lambda,
    param_groups,
)

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden" / "sft_tiny.json"
QUIET = OutputSection(progress_bar=False, plot=False)


# tiny matmuls: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    cfg = ModelConfig(
        architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=[2], torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(seed)
    return build_model(cfg)


def examples(n, seed=0, lo=4, hi=20):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(lo, hi)
        toks = [1] + [rng.randrange(3, 64) for _ in range(k - 1)]
        split = rng.randint(1, k - 2)
        out.append(D.Example(toks, [False] * split + [True] * (k - split), f"synthetic:{i + 1}"))
    return out


def lora_model(seed=0, dropout=0.0, r=4):
    m = tiny_model(seed)
    apply_lora(m, LoraConfig(r=r, alpha=2 * r, dropout=dropout), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # nonzero B so A has gradients too
        for mod in adapted_modules(m).values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
    return m


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def train_cfg(**kw):
    base = dict(
        max_steps=4,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        lr=5e-3,
        warmup_steps=1,
        seed=0,
        gradient_checkpointing="off",
    )
    base.update(kw)
    return TrainSection(**base)


def read_metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]


# ---- numerics of one step ----------------------------------------------------------------------


def test_packed_equals_padded_loss_and_grads():
    exs = examples(5, seed=1)
    n = sum(e.num_targets for e in exs)
    model = lora_model()
    packed = D.collate_packed(exs)
    padded = D.collate_padded(exs, pad_id=0)
    model.loss(**packed.model_inputs(), num_items=n).backward()
    g_packed = grads(model)
    loss_packed = model.loss(**packed.model_inputs(), num_items=n).item()
    model.zero_grad()
    loss_padded = model.loss(**padded.model_inputs(), num_items=n)
    loss_padded.backward()
    assert loss_padded.item() == pytest.approx(loss_packed, rel=1e-6)
    assert_grads_close(g_packed, grads(model))
    # and the packed row really is several documents: one long causal row gives another loss
    model.zero_grad()
    joined = model.loss(packed.input_ids, packed.labels, num_items=n).item()
    assert abs(joined - loss_packed) > 1e-4


def test_accumulation_over_uneven_micro_batches_equals_one_batch(tmp_path):
    exs = examples(6, seed=2, lo=3, hi=30)
    model = lora_model()
    planner = D.BatchPlanner(exs, 1, 32, packing=True)
    trainer = Trainer(model, planner, train_cfg(), tmp_path, output=QUIET)
    micro = [D.collate_packed(exs[:1]), D.collate_packed(exs[1:4]), D.collate_padded(exs[4:])]
    assert len({b.num_targets for b in micro}) == 3  # uneven on purpose
    loss_acc, _, n = trainer.forward_backward(micro)
    g_acc = grads(model)
    model.zero_grad()
    loss_one, _, n_one = trainer.forward_backward([D.collate_packed(exs)])
    assert n == n_one == sum(e.num_targets for e in exs)
    assert loss_acc.item() == pytest.approx(loss_one.item(), rel=1e-6)
    assert_grads_close(g_acc, grads(model))
    # averaging per-micro-batch means (the old accumulation bug) gives other gradients
    g_one = grads(model)
    model.zero_grad()
    for b in micro:
        (model.loss(**b.model_inputs()) / len(micro)).backward()
    g_naive = grads(model)
    worst = max(((g_naive[k] - g_one[k]).norm() / g_one[k].norm()).item() for k in g_one)
    assert worst > 1e-2


def test_gradient_checkpointing_gives_the_same_grads(tmp_path):
    exs = examples(4, seed=3)
    batch = [D.collate_packed(exs)]
    out = {}
    for mode in ("off", "on"):
        model = lora_model()
        model.train()
        t = Trainer(
            model,
            D.BatchPlanner(exs, 1, 32),
            train_cfg(gradient_checkpointing=mode),
            tmp_path / mode,
            output=QUIET,
        )
        assert model.gradient_checkpointing == (mode == "on")
        t.forward_backward(batch)
        out[mode] = grads(model)
    assert_grads_close(out["off"], out["on"], rtol=0, atol=0)


def test_loss_chunk_budget_reaches_the_model(tmp_path, monkeypatch):
    import qkern

    seen = []
    real = qkern.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunk_bytes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(qkern, "fused_linear_cross_entropy", spy)
    exs = examples(4, seed=3)
    for mib, want in ((0, None), (3, 3 * 2**20)):
        model = lora_model()
        model.train()
        t = Trainer(
            model, D.BatchPlanner(exs, 1, 32), train_cfg(loss_chunk_mib=mib), tmp_path / str(mib),
            output=QUIET,
        )  # fmt: skip
        assert model.loss_chunk_bytes == want
        t.forward_backward([D.collate_packed(exs)])
        assert seen[-1] == want
    cfg = TrainConfig()
    cfg.train.loss_chunk_mib = -1
    with pytest.raises(ConfigError, match="loss_chunk_mib"):
        cfg.validate()


def test_offloaded_checkpointing_selected_by_config(tmp_path):
    offload = pytest.importorskip("qkern_train.offload")
    exs = examples(4, seed=3)
    model = lora_model()
    model.train()
    t = Trainer(
        model,
        D.BatchPlanner(exs, 1, 32),
        train_cfg(gradient_checkpointing="offload"),
        tmp_path,
        output=QUIET,
    )
    assert model.gradient_checkpointing and model.checkpoint_fn is offload.offloaded_checkpoint
    t.forward_backward([D.collate_packed(exs)])
    want = lora_model()
    want.train()
    Trainer(want, D.BatchPlanner(exs, 1, 32), train_cfg(), tmp_path / "ref", output=QUIET
            ).forward_backward([D.collate_packed(exs)])  # fmt: skip
    assert_grads_close(grads(model), grads(want))


def test_adamw8bit_selected_by_config(tmp_path):
    optim8bit = pytest.importorskip("qkern.optim8bit")
    exs = examples(8, seed=12)
    trainer, res = run(tmp_path, lora_model(), exs, train_cfg(max_steps=3, optimizer="adamw8bit"))
    assert isinstance(trainer.optimizer, optim8bit.AdamW8bit)
    assert res["steps"] == 3 and math.isfinite(res["final_loss"])


# ---- optimizer, schedule -----------------------------------------------------------------------


def test_weight_decay_excludes_norms_and_biases():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert not any("norm" in names[id(p)] for p in decay["params"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(tiny_model().requires_grad_(False), 0.0)


def test_lr_schedules():
    total, warm = 10, 2
    cos = [lr_lambda(s, total, warm, "cosine", 0.1) for s in range(total)]
    assert cos[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cos[2 + 4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(cos[2:], cos[3:])) and cos[-1] > 0.1
    lin = [lr_lambda(s, total, 0, "linear", 0.0) for s in range(total)]
    assert lin == pytest.approx([1 - s / 10 for s in range(10)])
    assert lr_lambda(7, total, warm, "constant", 0.0) == 1.0
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        lr_lambda(5, total, 0, "step", 0.0)


# ---- the loop ----------------------------------------------------------------------------------


def run(tmp, model, exs, cfg, callbacks=None, resume=None, eval_exs=None, packing=False):
    planner = D.BatchPlanner(exs, cfg.micro_batch_size, 32, packing=packing, seed=cfg.seed)
    ev = D.BatchPlanner(eval_exs, 2, 32, packing, shuffle=False) if eval_exs else None
    t = Trainer(
        model,
        planner,
        cfg,
        tmp,
        eval_data=ev,
        output=QUIET,
        lora_config=LoraConfig(r=4, alpha=8, dropout=0.1),
        callbacks=callbacks,
    )
    return t, t.fit(resume_from=resume)


class Interrupt(Exception):
    pass


def test_resume_gives_the_same_loss_curve(tmp_path):
    exs = examples(12, seed=4)
    cfg = train_cfg(max_steps=7, save_steps=2, save_total_limit=0)
    # dropout draws random numbers: the RNG state must be restored too
    _, full = run(tmp_path / "a", lora_model(dropout=0.1), exs, cfg)

    def stop_at_5(trainer, rec):
        if rec["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "b", lora_model(dropout=0.1), exs, cfg, callbacks=[stop_at_5])
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-2", "checkpoint-4"]
    assert read_metrics(tmp_path / "b")[-1]["step"] == 5  # logged after the last checkpoint
    # a fresh process: new model object (same base), resume from the newest checkpoint
    _, resumed = run(tmp_path / "b", lora_model(seed=0, dropout=0.1), exs, cfg, resume="auto")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "lr", "tokens", "target_tokens", "epoch"):
            assert ra[key] == rb[key], (ra["step"], key)
    assert resumed["steps"] == full["steps"] == 7 and a[-1]["epoch"] > 1  # crossed an epoch


def test_resume_refuses_changed_settings(tmp_path):
    exs = examples(8, seed=5)
    run(tmp_path, lora_model(), exs, train_cfg(max_steps=2, save_steps=2))
    with pytest.raises(ValueError, match=r"settings differ \(micro_batch_size: checkpoint 2"):
        run(tmp_path, lora_model(), exs, train_cfg(max_steps=4, micro_batch_size=1), resume="auto")


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    exs = examples(8, seed=6)
    cfg = train_cfg(max_steps=2, save_steps=2)
    trainer, _ = run(tmp_path, lora_model(), exs, cfg)
    good = latest_checkpoint(tmp_path)
    assert good.name == "checkpoint-2"
    trainer.state.step = 3
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if str(f).endswith("scheduler.pt"):  # fail half-way through writing the checkpoint
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    # what a kill -9 mid-save leaves behind is ignored as well
    (tmp_path / ".checkpoint-9.tmp-1234").mkdir()
    (tmp_path / "checkpoint-8").mkdir()  # a directory without trainer_state.json
    assert latest_checkpoint(tmp_path) == good
    fresh = Trainer(
        lora_model(seed=9),
        D.BatchPlanner(exs, 2, 32, packing=False),
        cfg,
        tmp_path,
        output=QUIET,
        lora_config=LoraConfig(r=4, alpha=8),
    )
    fresh.load_checkpoint(good)
    assert fresh.state.step == 2
    for (n, p), q in zip(trainer.model.named_parameters(), fresh.model.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n


def test_save_total_limit_and_overwrite(tmp_path):
    exs = examples(8, seed=7)
    trainer, _ = run(
        tmp_path, lora_model(), exs, train_cfg(max_steps=5, save_steps=1, save_total_limit=2)
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    trainer.save_checkpoint()  # same step again: replaced, not duplicated
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nan_guard_names_the_step(tmp_path):
    model = lora_model()
    real = model.loss
    calls = {"n": 0}

    def loss(*a, **kw):
        calls["n"] += 1
        out = real(*a, **kw)
        return out * float("nan") if calls["n"] == 5 else out

    model.loss = loss
    with pytest.raises(TrainingDiverged, match=r"step 3: the loss is nan.*learning rate"):
        run(tmp_path, model, examples(8), train_cfg(max_steps=4))


def test_early_stopping_and_eval(tmp_path, monkeypatch):
    exs = examples(10, seed=8)
    cfg = train_cfg(max_steps=20, eval_steps=1, early_stopping_patience=2)
    values = iter([1.0, 0.9, 0.95, 0.96, 0.5])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(values))
    _, res = run(tmp_path, lora_model(), exs, cfg, eval_exs=exs[:3])
    assert res["stopped_early"] and res["steps"] == 4 and res["best_eval_loss"] == 0.9
    evals = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert [r["eval_loss"] for r in evals] == [1.0, 0.9, 0.95, 0.96]


def test_evaluate_is_the_token_mean(tmp_path):
    exs = examples(6, seed=9)
    model = lora_model()
    planner = D.BatchPlanner(exs, 2, 32, packing=True, shuffle=False)
    t = Trainer(model, planner, train_cfg(), tmp_path, eval_data=planner, output=QUIET)
    want = model.loss(**D.collate_packed(exs).model_inputs()).item()
    assert t.evaluate() == pytest.approx(want, rel=1e-5)


def test_epochs_mode_counts_micro_batches(tmp_path):
    exs = examples(10, seed=10)
    cfg = train_cfg(max_steps=-1, epochs=1.5, micro_batch_size=2, gradient_accumulation_steps=2)
    _, res = run(tmp_path, lora_model(), exs, cfg)
    # 5 micro-batches per epoch; 1.5 epochs = 5 + round(2.5) = 7 micro-batches -> 4 steps, the
    # last one with a single micro-batch; training ends 2 micro-batches into the second epoch
    metrics = read_metrics(tmp_path)
    assert res["steps"] == 4 and metrics[-1]["epoch"] == pytest.approx(1.4)
    assert sum(r["tokens"] for r in metrics) == sum(e.num_inputs for e in exs) + sum(
        D.collate_padded([exs[i] for i in mb]).num_tokens
        for mb in D.BatchPlanner(exs, 2, 32, packing=False).micro_batches(1)[:2]
    )


# ---- golden loss curve -------------------------------------------------------------------------


def golden_run(tmp_path: Path) -> list[float]:
    """A seeded QLoRA run: NF4 base, LoRA r=4, packing, accumulation 2, cosine with warmup."""
    save_model(tiny_model(seed=0), tmp_path / "base", dtype=torch.float32)
    model = load_model(tmp_path / "base", load_in_4bit=True, dtype=torch.float32, device="cpu")
    cfg = LoraConfig(r=4, alpha=8)
    apply_lora(model, cfg, seed=0)
    exs = examples(40, seed=11)
    planner = D.BatchPlanner(exs, 2, 32, packing=True, seed=0)
    tc = train_cfg(max_steps=8, lr=2e-2, warmup_steps=2, gradient_checkpointing="on")
    Trainer(model, planner, tc, tmp_path / "run", output=QUIET, lora_config=cfg).fit()
    return [r["loss"] for r in read_metrics(tmp_path / "run")]


def test_golden_loss_curve(tmp_path):
    losses = golden_run(tmp_path)
    if os.environ.get("QKERN_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "what": "tests/test_trainer.py::golden_run (seeded tiny QLoRA run, CPU, 1 thread)",
            "loss": losses,
        }, indent=2) + "\n")  # fmt: skip
    want = json.loads(GOLDEN.read_text())["loss"]
    assert len(losses) == len(want) == 8
    assert losses[-1] < losses[0] - 0.05  # it learns
    for step, (got, ref) in enumerate(zip(losses, want), start=1):
        assert got == pytest.approx(ref, rel=1e-4), f"step {step}: {got} vs golden {ref}"


# ---- GPU: the Triton kernels under the trainer ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_qlora_training_on_gpu(tmp_path, precision):
    save_model(tiny_model(seed=0), tmp_path / "base", dtype=torch.bfloat16)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model = load_model(tmp_path / "base", load_in_4bit=True, dtype=dtype, device="cuda")
    cfg = LoraConfig(r=4, alpha=8)
    apply_lora(model, cfg, seed=0)
    exs = examples(40, seed=11)
    planner = D.BatchPlanner(exs, 2, 32, packing=True, seed=0)
    tc = train_cfg(max_steps=12, lr=2e-2, warmup_steps=2, gradient_checkpointing="on",
                   save_steps=6)  # fmt: skip
    trainer = Trainer(model, planner, tc, tmp_path / "run", output=QUIET, lora_config=cfg)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (trainer.scaler is not None) == (precision == "fp16")
    res = trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert res["steps"] == 12 and all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.params)  # fp32 adapters
    assert read_metrics(tmp_path / "run")[-1]["peak_mem_gb"] > 0
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-12"
