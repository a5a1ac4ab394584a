"""The supervised fine-tuning loop: optimizer, schedule, accumulation, checkpoints, logging.

One optimizer step
    1. take ``gradient_accumulation_steps`` micro-batches from the :class:`~qkern_train.data.
       BatchPlanner` stream and count their target tokens N (labels != -100) **first**;
    2. for each micro-batch: ``loss_i = model.loss(..., num_items=N)``, i.e. the SUM of its
       token losses divided by the step's total N, and ``loss_i.backward()``;
    3. the gradients now equal those of the mean token loss over all N targets of the step —
       the same as one big batch, whatever the split. (Averaging per-micro-batch means instead
       weights tokens of short micro-batches more: the accumulation bug HF and Unsloth fixed in
       2024.) The logged loss is Σ loss_i;
    4. NaN/Inf guard, unscale (fp16), clip the global grad norm, optimizer step, LR schedule step.

Precision
    The model computes in ``train.precision`` (bf16 on a GPU that supports it by default, fp32 on
    CPU); adapter weights and optimizer states stay fp32 (QLoRALinear and LoRALinear cast them
    to the compute dtype for the matmuls). fp16 adds a ``GradScaler`` (loss scaling; steps with
    inf gradients are skipped and the scale lowered).

Checkpoints (``output_dir/checkpoint-<step>``)
    Adapter (HF PEFT files) or, without adapters, ``trainable.safetensors``; ``optimizer.pt``,
    ``scheduler.pt``, ``scaler.pt`` (fp16), ``rng.pt`` (torch CPU + every CUDA device + Python),
    ``trainer_state.json`` (step, data position = next micro-batch's epoch and index, early
    stopping state, the settings that must match on resume). Each is written into a temporary
    directory that is renamed into place only when complete, so a crash mid-save leaves the
    previous checkpoints intact and never a half-written one under a checkpoint name.
    ``save_total_limit`` keeps the newest N. Resuming restores all of it and rebuilds the data
    order from the seed, so the loss curve continues exactly as if never interrupted.

Logging
    ``metrics.jsonl`` (one JSON object per logged step, plus eval lines), a tqdm bar with loss,
    lr, tokens/s and peak memory, TensorBoard / Weights & Biases when requested and installed,
    and ``loss_curve.png`` at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkern_train.config import OutputSection, TrainConfig, TrainSection
from qkern_train.data import BatchPlanner
from qkern_train.lora import (
    ADAPTER_WEIGHTS,
    LoraConfig,
    adapted_modules,
    load_adapter,
    save_adapter,
)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
# settings that change the data order or the math: a resume with different values is refused
_RESUME_KEYS = (
    "seed",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "lr",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "min_lr_ratio",
    "max_steps",
    "epochs",
    "optimizer",
    "weight_decay",
)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/Inf."""


@dataclass
class TrainerState:
    """Progress that a checkpoint stores (everything else is rebuilt from the config)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: epoch of the next micro-batch
    batch_index: int = 0  # data position: index of the next micro-batch in its epoch
    micro_batches_done: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and a group without weight decay
    (1-D tensors: norms and biases, and anything named like a norm or a bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "norm" in name or name.endswith("bias")
        (no_decay if skip else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (apply_lora first?)")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw8bit":
        try:
            from qkern.optim8bit import AdamW8bit
        except ImportError as e:
            raise ValueError(f"train.optimizer = 'adamw8bit' needs qkern.optim8bit: {e}") from None
        return AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adamw or adamw8bit")
    params = [p for g in groups for p in g["params"]]
    on_cuda = all(p.is_cuda for p in params)
    # fused: one kernel for all parameters on CUDA; foreach: batched ops on the CPU
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, **kind)


def lr_lambda(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """LR multiplier of the ``step``-th optimizer step (0-based).

    Warmup ramps linearly (step+1)/(warmup+1), so the first step already moves; then
    ``progress = (step - warmup) / (total - warmup)`` goes from 0 (full LR) towards 1, and
    cosine gives min + (1-min)·(1+cos(π·progress))/2, linear 1 - (1-min)·progress.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"unknown lr_scheduler {kind!r}; expected cosine, linear or constant")


def warmup_steps(cfg: TrainSection, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total)


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = name[len(CHECKPOINT_PREFIX) :]
    return int(tail) if tail.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary directories ignored)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [
        (s, p)
        for p in d.iterdir()
        if p.is_dir() and (s := _step_of(p)) is not None and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def atomic_directory(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)``, then rename the finished directory to ``final``.

    A crash or exception inside ``write`` leaves ``final`` untouched (and, for an exception, no
    temporary directory either). An existing ``final`` is replaced: it is renamed aside first
    and deleted after the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir_files(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir_files(d: Path) -> None:
    """Flush every file to disk before the rename makes the directory visible."""
    for p in d.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# Devices, precision, memory


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype for ``train.precision`` on ``device``."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in table:
        raise ValueError(f"unknown precision {precision!r}; expected auto, bf16, fp16 or fp32")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' (with loss scaling) needs a CUDA device; use fp32")
    return table[precision]


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated memory: CUDA allocator peak on a GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


# ---------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Trains whatever parameters of ``model`` require grad (adapters after ``apply_lora``, or
    all of them for pre-training) on micro-batches from ``train_data``.

    ``callbacks`` are called as ``cb(trainer, metrics)`` after every optimizer step (for custom
    logging or stopping; the tests use one to interrupt a run).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchPlanner,
        cfg: TrainSection,
        output_dir: str | Path,
        eval_data: BatchPlanner | None = None,
        output: OutputSection | None = None,
        lora_config: LoraConfig | None = None,
        base_model_path: str | None = None,
        callbacks: list[Callable[[Trainer, dict], None]] | None = None,
    ) -> None:
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.cfg = cfg
        self.out = output or OutputSection()
        self.output_dir = Path(output_dir)
        self.lora_config = lora_config
        self.base_model_path = base_model_path
        self.callbacks = list(callbacks or [])
        self.device = _model_device(model)
        self.state = TrainerState()
        self.history: list[dict] = []

        if cfg.max_steps > 0:
            self.total_micro_batches = None
            self.total_steps = cfg.max_steps
        else:
            self.total_micro_batches = train_data.total_micro_batches(cfg.epochs)
            self.total_steps = math.ceil(self.total_micro_batches / cfg.gradient_accumulation_steps)

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg)
        warm = warmup_steps(cfg, self.total_steps)
        total, kind, floor = self.total_steps, cfg.lr_scheduler, cfg.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, total, warm, kind, floor)
        )
        dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
        self.scaler = (
            torch.amp.GradScaler("cuda")
            if dtype == torch.float16 and self.device.type == "cuda"
            else None
        )
        self._set_checkpointing(cfg.gradient_checkpointing)
        if cfg.loss_chunk_mib and hasattr(self.model, "loss_chunk_bytes"):
            self.model.loss_chunk_bytes = cfg.loss_chunk_mib * 2**20
        self._tb = None
        self._wandb = None

    # -- setup -----------------------------------------------------------------------------------

    def _set_checkpointing(self, mode: str) -> None:
        if not hasattr(self.model, "gradient_checkpointing"):
            return
        if mode == "off":
            self.model.gradient_checkpointing = False
        elif mode == "on":
            self.model.gradient_checkpointing = True
        elif mode == "offload":
            try:
                from qkern_train.offload import offloaded_checkpoint
            except ImportError as e:
                raise ValueError(
                    f"train.gradient_checkpointing = 'offload' needs qkern_train.offload: {e}"
                ) from None
            self.model.gradient_checkpointing = True
            self.model.checkpoint_fn = offloaded_checkpoint
        else:
            raise ValueError(f"gradient_checkpointing must be on, off or offload, got {mode!r}")

    def _open_loggers(self, config: dict | None) -> None:
        if self.out.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                warnings.warn(
                    "output.tensorboard is on but tensorboard is not installed; skipped",
                    stacklevel=2,
                )
        if self.out.wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=self.out.wandb_project, config=config or {})
            except ImportError:
                warnings.warn(
                    "output.wandb_project is set but wandb is not installed; skipped", stacklevel=2
                )

    # -- checkpoints -----------------------------------------------------------------------------

    def _resume_settings(self) -> dict[str, Any]:
        return {k: getattr(self.cfg, k) for k in _RESUME_KEYS} | {
            "packing": self.train_data.packing,
            "max_seq_length": self.train_data.max_seq_length,
            "num_examples": len(self.train_data.examples),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically and prune old ones (save_total_limit)."""
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step}"

        def write(d: Path) -> None:
            if adapted_modules(self.model):
                save_adapter(self.model, d, self.lora_config, self.base_model_path)
            else:
                from safetensors.torch import save_file

                tensors = {
                    n: p.detach().cpu().contiguous()
                    for n, p in self.model.named_parameters()
                    if p.requires_grad
                }
                save_file(tensors, str(d / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), d / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), d / "scheduler.pt")
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), d / "scaler.pt")
            rng = {"cpu": torch.get_rng_state(), "python": random.getstate()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, d / "rng.pt")
            state = {"state": asdict(self.state), "settings": self._resume_settings()}
            # written last: its presence marks a complete checkpoint even without the rename
            (d / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

        path = atomic_directory(final, write)
        if self.cfg.save_total_limit > 0:
            for old in list_checkpoints(self.output_dir)[: -self.cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore trainable weights, optimizer, scheduler, scaler, RNG and data position."""
        d = Path(path)
        if not (d / STATE_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a complete checkpoint (no {STATE_FILE})")
        saved = json.loads((d / STATE_FILE).read_text())
        mismatched = {
            k: (v, saved["settings"].get(k))
            for k, v in self._resume_settings().items()
            if k in saved["settings"] and saved["settings"][k] != v
        }
        if mismatched:
            detail = ", ".join(
                f"{k}: checkpoint {b!r} vs now {a!r}" for k, (a, b) in mismatched.items()
            )
            raise ValueError(f"cannot resume from {d}: settings differ ({detail})")
        if (d / ADAPTER_WEIGHTS).is_file():
            load_adapter(self.model, d, trainable=True)
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(d / "trainable.safetensors"))
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in tensors.items():
                    params[n].copy_(t)
        load = lambda name: torch.load(d / name, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(load("optimizer.pt"))
        self.scheduler.load_state_dict(load("scheduler.pt"))
        if self.scaler is not None and (d / "scaler.pt").is_file():
            self.scaler.load_state_dict(load("scaler.pt"))
        rng = load("rng.pt")
        torch.set_rng_state(rng["cpu"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.state = TrainerState(**saved["state"])

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the whole eval set (sum of token losses / target tokens)."""
        if self.eval_data is None:
            raise ValueError("no eval data")
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = 0
        for idx in self.eval_data.micro_batches(0):
            b = self.eval_data.collate(idx).to(self.device)
            total += self.model.loss(**b.model_inputs(), num_items=1).double()
            targets += b.num_targets
        self.model.train(was_training)
        return float(total) / max(1, targets)

    # -- the loop --------------------------------------------------------------------------------

    def forward_backward(self, micro: list) -> tuple[torch.Tensor, int, int]:
        """Accumulate gradients of one optimizer step over ``micro`` (a list of Batch).

        The target tokens of all micro-batches are counted first (N), and each micro-batch's
        loss is its token-loss sum / N, so the accumulated gradient is that of the mean over
        all N tokens, independent of how they are split. Returns (Σ losses, tokens, N).
        """
        num_items = sum(b.num_targets for b in micro)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens = 0
        for b in micro:
            b = b.to(self.device)
            loss = self.model.loss(**b.model_inputs(), num_items=num_items)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach().float()
            tokens += b.num_tokens
        return loss_sum, tokens, num_items

    def _metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        with open(self._metrics_path(), "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, rec["step"])
        if self._wandb is not None:
            self._wandb.log(rec, step=rec["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past ``step`` (written by an interrupted run after its checkpoint)."""
        path = self._metrics_path()
        if not path.is_file():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in keep))
        self.history = [json.loads(line) for line in keep]

    def _diverged(self, what: str, value: float, step: int, position: str) -> TrainingDiverged:
        lr = self.scheduler.get_last_lr()[0]
        causes = [
            f"the learning rate is too high (lr={lr:.3g} at this step; lower train.lr or add "
            "warmup)",
        ]
        if self.scaler is None and any(p.dtype == torch.float16 for p in self.model.parameters()):
            causes.insert(0, "fp16 overflow (use precision = 'bf16')")
        elif self.scaler is not None:
            causes.insert(0, "fp16 overflow in the forward pass (use precision = 'bf16')")
        causes.append(f"a bad batch: look at the examples of {position}")
        return TrainingDiverged(
            f"training stopped at step {step}: {what} is {value} — likely cause: "
            + "; or ".join(causes)
        )

    def fit(self, resume_from: str | Path | None = None, config: dict | None = None) -> dict:
        """Train to ``max_steps`` / ``epochs`` (or early stop); returns a summary dict.

        ``resume_from``: a checkpoint directory, or "auto" for the newest one in output_dir.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from == "auto":
            resume_from = latest_checkpoint(self.output_dir)
        if resume_from:
            self.load_checkpoint(resume_from)
            self._truncate_metrics(self.state.step)
        else:
            self._metrics_path().write_text("")
            torch.manual_seed(self.cfg.seed)
            random.seed(self.cfg.seed)
        self._open_loggers(config)
        cfg, st = self.cfg, self.state
        ga = cfg.gradient_accumulation_steps
        stream = self.train_data.stream(st.epoch, st.batch_index)
        per_epoch = len(self.train_data.micro_batches(0))
        bar = None
        if self.out.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=st.step,
                desc="train",
                dynamic_ncols=True,
                file=sys.stdout,
            )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        t_start = time.perf_counter()
        last_saved = st.step if resume_from else -1
        try:
            while st.step < self.total_steps and not st.stopped_early:
                t0 = time.perf_counter()
                micro = []
                first_pos = (st.epoch, st.batch_index)
                for _ in range(ga):
                    if (
                        self.total_micro_batches is not None
                        and st.micro_batches_done + len(micro) >= self.total_micro_batches
                    ):
                        break
                    epoch, index, batch = next(stream)
                    micro.append(batch)
                    st.epoch, st.batch_index = epoch, index + 1
                if not micro:
                    break
                position = (
                    f"epoch {first_pos[0]}, micro-batches {first_pos[1]}.."
                    f"{first_pos[1] + len(micro) - 1}"
                )
                loss_sum, tokens, num_items = self.forward_backward(micro)
                loss_value = float(loss_sum)
                step_no = st.step + 1
                if not math.isfinite(loss_value):
                    raise self._diverged("the loss", loss_value, step_no, position)
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                if not math.isfinite(grad_norm) and self.scaler is None:
                    raise self._diverged("the gradient norm", grad_norm, step_no, position)
                lr = self.scheduler.get_last_lr()[0]
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                st.step = step_no
                st.micro_batches_done += len(micro)
                st.tokens_seen += tokens
                dt = time.perf_counter() - t0
                rec = {
                    "step": st.step,
                    "epoch": round(st.epoch + st.batch_index / max(1, per_epoch), 4),
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "target_tokens": num_items,
                    "tokens_per_s": tokens / max(dt, 1e-9),
                    "peak_mem_gb": round(peak_memory_gb(self.device), 3),
                    "elapsed_s": round(time.perf_counter() - t_start, 3),
                }
                if st.step % cfg.logging_steps == 0 or st.step == self.total_steps:
                    self._log(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{rec['tokens_per_s']:.0f}",
                        mem=f"{rec['peak_mem_gb']:.2f}G",
                        refresh=False,
                    )
                due_eval = cfg.eval_steps > 0 and st.step % cfg.eval_steps == 0
                if self.eval_data is not None and due_eval:
                    self._eval_and_early_stop()
                if cfg.save_steps > 0 and st.step % cfg.save_steps == 0:
                    self.save_checkpoint()
                    last_saved = st.step
                for cb in self.callbacks:
                    cb(self, rec)
        finally:
            if bar is not None:
                bar.close()
        if self.eval_data is not None and (cfg.eval_steps <= 0 or st.step % cfg.eval_steps):
            self._eval_and_early_stop()
        if cfg.save_steps > 0 and last_saved != st.step:
            self.save_checkpoint()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        train_losses = [r["loss"] for r in self.history if "loss" in r]
        return {
            "steps": st.step,
            "final_loss": train_losses[-1] if train_losses else None,
            "best_eval_loss": st.best_eval_loss,
            "tokens_seen": st.tokens_seen,
            "stopped_early": st.stopped_early,
            "train_seconds": round(time.perf_counter() - t_start, 2),
        }

    def _eval_and_early_stop(self) -> float:
        st, cfg = self.state, self.cfg
        loss = self.evaluate()
        self._log({"step": st.step, "eval_loss": loss})
        if st.best_eval_loss is None or loss < st.best_eval_loss - cfg.early_stopping_threshold:
            st.best_eval_loss = loss
            st.evals_without_improvement = 0
        else:
            st.evals_without_improvement += 1
            if 0 < cfg.early_stopping_patience <= st.evals_without_improvement:
                st.stopped_early = True
        return loss


# ---------------------------------------------------------------------------------------------
# `qkern-train sft`


def run_sft(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Load model, tokenizer and data per ``cfg``, train LoRA/QLoRA adapters, save them.

    All checks that can fail (config values, paths, data records) run before the model loads.
    Writes ``<output.dir>/config.toml``, ``metrics.jsonl``, ``adapter/`` (PEFT),
    ``loss_curve.png``, checkpoints, and ``merged/`` when ``output.save_merged``.
    """
    from qkern_train import data as data_mod
    from qkern_train.checkpoint import load_model
    from qkern_train.config import to_toml
    from qkern_train.lora import apply_lora, merge_and_save, summary
    from qkern_train.tokenizer import load_tokenizer

    cfg.validate()
    model_dir = Path(cfg.model.path)
    if not cfg.model.path or not model_dir.is_dir():
        raise FileNotFoundError(f"model.path: model directory {cfg.model.path!r} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {model_dir} has no config.json")
    if not cfg.data.path:
        raise ValueError("data.path is not set")
    device = resolve_device(cfg.model.device)
    dtype = resolve_precision(cfg.train.precision, device)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)

    d = cfg.data
    kw = dict(
        fmt=d.format,
        template=d.template,
        train_on_responses_only=d.train_on_responses_only,
        max_seq_length=d.max_seq_length,
        overlong=d.overlong,
        system_prompt=d.system_prompt,
    )
    examples, stats = data_mod.load_examples(d.path, tokenizer, **kw)
    log(
        f"data: {stats.records} records -> {stats.examples} examples, {stats.tokens} tokens "
        f"({stats.targets} targets); truncated {stats.truncated}, dropped {stats.dropped}, "
        f"split {stats.chunked}"
    )
    if stats.report is not None:
        log("data: " + stats.report.format())
    if d.eval_path:
        eval_examples, _ = data_mod.load_examples(d.eval_path, tokenizer, **kw)
    else:
        examples, eval_examples = data_mod.split_eval(examples, d.eval_split, cfg.train.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t = cfg.train
    train_data = BatchPlanner(
        examples, t.micro_batch_size, d.max_seq_length, d.packing, t.seed, pad
    )
    eval_data = (
        BatchPlanner(
            eval_examples,
            t.micro_batch_size,
            d.max_seq_length,
            d.packing,
            t.seed,
            pad,
            shuffle=False,
        )
        if eval_examples
        else None
    )

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    model = load_model(
        cfg.model.path, load_in_4bit=cfg.model.load_in_4bit, dtype=dtype, device=device
    )
    tokenizer.check_vocab(model.config.vocab_size)
    apply_lora(model, cfg.lora, seed=t.seed)
    log(
        f"model: {cfg.model.path} ({'NF4' if cfg.model.load_in_4bit else str(dtype)}) on "
        f"{device}; LoRA r={cfg.lora.r}: {summary(model)}"
    )
    trainer = Trainer(model, train_data, t, out, eval_data, cfg.output, cfg.lora, cfg.model.path)
    resume = t.resume_from or None
    result = trainer.fit(resume_from=resume, config=cfg.to_dict())
    adapter_dir = atomic_directory(
        out / "adapter", lambda p: save_adapter(model, p, cfg.lora, cfg.model.path)
    )
    result["adapter"] = str(adapter_dir)
    log(f"adapter saved to {adapter_dir}")
    if cfg.output.plot and trainer.history:
        from qkern_train.plotting import plot_metrics

        result["loss_curve"] = str(plot_metrics(out / METRICS_FILE, out / "loss_curve.png"))
    if cfg.output.save_merged:
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # merge from the original 16-bit weights, not the NF4 approximation used in training
        base = load_model(cfg.model.path, load_in_4bit=False, dtype=dtype, device=device)
        load_adapter(base, adapter_dir)
        merged = merge_and_save(
            base,
            out / "merged",
            cfg.output.merged_dtype,
            tokenizer_dir=cfg.model.tokenizer or cfg.model.path,
        )
        result["merged"] = str(merged)
        log(f"merged model saved to {merged}")
    return result
