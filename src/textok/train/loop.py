"""The training loop: one skeleton for every model textok trains, the tokenizers and the generators.

A :class:`Task` brings what differs between them: its model, its loss, its other parts and how to take one
step. The loop owns the run: the run directory and its lock, the model's device placement, its EMA and optimizer,
FSDP sharding or DDP wrapping and torch.compile, resuming from the newest intact checkpoint (one state layout for
every task: ``model``, ``ema``, ``opt``, ``rng`` and the task's own parts), the learning-rate schedule, gradient
clipping and the optimizer step, Ctrl-C / SIGTERM (save, then stop), the check for non-finite losses, the log,
the progress bar, the checkpoints and the final model.

Exact resume: a checkpoint holds everything a resumed run needs (weights, EMA, optimizers, RNG state, the
step and whatever state the task adds), and a task draws its data and every random number of a step as a
pure function of the step, so N + N steps equal 2N steps bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config
from ..distributed import DistInfo, any_rank, barrier, distributed_session, wrap_ddp
from ..errors import TextokError
from ..eta import Eta
from ..text.store import open_text_states
from . import fsdp
from .checkpoint import DISK_FULL, CheckpointManager, rng_state, set_rng_state
from .config import RunConfig
from .ema import EMA
from .fsdp import local_value
from .interrupt import GracefulInterrupt
from .log import JsonlLog, progress_bar
from .rundir import open_run, run_lock


@dataclasses.dataclass
class StepResult:
    """What one training step tells the loop."""

    logs: dict[str, torch.Tensor]  # loss terms and metrics, detached (averaged over micro-batches)
    finite: torch.Tensor  # False when a loss of the step was NaN/inf: a flag on the device, read only at log time
    images: int = 0  # images (or samples) this process trained on
    skipped: int = 0  # images of the step's batches that could not be decoded


class Task:
    """One kind of model's side of the loop: its model and loss, its other parts and one step.

    ``__init__`` decides the model (``model_type``, ``model_config``) before the run directory is opened, so
    that a resumed checkpoint is checked against it. The loop then makes the model (:meth:`make_model`, placed on
    the device), its EMA and optimizer and ``loss_module`` (the model's :meth:`loss` as one module call), calls
    :meth:`build` for the task's other parts, and wraps ``loss_module`` into ``train_model`` (FSDP, DDP, compile),
    which :meth:`step` calls.
    """

    kind: str  # what a resumed checkpoint must have been written for: "tokenizer" | "generator"
    rate_key = "images_per_s"  # the log's throughput entry
    shown: tuple[str, ...] = ()  # log values on the progress bar
    loss_name = "a loss"  # what the message about a NaN/inf loss calls it

    model_type: str
    model_config: Config
    # made by the loop
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    loss_module: nn.Module
    train_model: nn.Module

    def __init__(self, cfg: RunConfig, out: Path, info: DistInfo, progress: bool) -> None:
        self.cfg, self.out, self.info, self.progress = cfg, out, info, progress
        # FSDP (``cfg.fsdp``): the state and the final weights are gathered over ``sharded`` by every rank
        self.sharded: DistInfo | None = info if cfg.fsdp else None

    def make_model(self) -> nn.Module:
        """A freshly initialised model of ``model_config`` (the loop places it on the device)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, *inputs: Any) -> Any:
        """What ``train_model(*inputs)`` computes: the loss of ``model`` on one step's inputs."""
        raise NotImplementedError

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return adamw(model, self.cfg.optim)

    def build(self, fresh: bool) -> None:
        """Make the task's other parts on ``self.info.device`` once the model, EMA and optimizer exist (``fresh``:
        no checkpoint will be restored into them)."""

    def extra_state(self) -> dict[str, Any]:
        """The task's own parts a resumed run restores, besides the model, EMA, optimizer and RNG."""
        return {}

    def restore_extra(self, state: dict[str, Any]) -> None:
        """Load what :meth:`extra_state` saved (``state`` is the whole checkpoint)."""

    def begin(self, step: int) -> None:
        """Get ready to train from ``step`` on (``train_model`` is wrapped): open the data at that step."""
        raise NotImplementedError

    def step(self, step: int, lr: float) -> StepResult:
        """Forward and backward of one step (the loop then clips and steps ``optimizer``); updates of other
        parts (a discriminator) happen here too."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Work done after ``step`` steps, before its checkpoint (e.g. a picture of the reconstructions)."""

    def end(self) -> None:
        """Release what the run holds (its data workers) once the loop stops, by finishing or by an error: the
        next run into the same directory must not find its lock held by a worker that inherited it."""

    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        """What a checkpoint records besides the state (configs, the data position)."""
        return {"model_type": self.model_type, "model_config": self.model_config.to_dict(),
                "train_config": self.cfg.to_dict()}

    def save_final(self, model: nn.Module, final: Path, step: int) -> None:
        """Write the trained model (the EMA weights, whole) to ``final`` after the last step."""
        model.save_pretrained(final, extra={"train_step": step})


# ---- what the loop does with every task's model ---------------------------------------------------------
def _build(task: Task, cfg: RunConfig, info: DistInfo, fresh: bool) -> None:
    task.model = task.make_model().to(info.device)
    task.ema = EMA(task.model, cfg.ema_decay)
    task.optimizer = task.make_optimizer(task.model)
    task.loss_module = LossForward(task.model, task.loss)
    task.build(fresh)
    if cfg.fsdp:  # after build: weights a task loads (init_from) are sharded with the rest
        task.optimizer = fsdp.shard_training(task.loss_module, task.model, task.ema, info,
                                             lambda: task.make_optimizer(task.model))


def _wrap(task: Task, cfg: RunConfig, info: DistInfo) -> None:
    task.train_model = task.loss_module if cfg.fsdp else wrap_ddp(task.loss_module, info)
    if cfg.compile:
        task.train_model = torch.compile(task.train_model)


def _state(task: Task) -> dict[str, Any]:
    """The checkpoint: one layout for every task; an FSDP run's parts gathered whole, keyed as a plain model's."""
    model, ema, opt = fsdp.training_state(task.model, task.ema, task.optimizer, task.sharded)
    return {"model": model, "ema": ema, "opt": opt, "rng": rng_state(), **task.extra_state()}


def _restore(task: Task, state: dict[str, Any]) -> None:
    opt = state["opt"] if "opt" in state else state["opt_g"]  # tokenizer checkpoints written before: "opt_g"
    fsdp.restore_training(task.model, task.ema, task.optimizer, (state["model"], state["ema"], opt), task.sharded)
    task.restore_extra(state)
    set_rng_state(state["rng"])


def train(task_cls: type[Task], cfg: RunConfig, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) a ``task_cls`` model as ``cfg`` says into ``out``; returns ``out/final``, which holds the
    EMA weights (``from_pretrained``-ready) once ``cfg.max_steps`` are done."""
    out = Path(out)
    with distributed_session(cfg.device) as info, run_lock(out, enabled=info.is_main):
        task = task_cls(cfg, out, info, progress)
        try:
            return _run(task, cfg, out, info, progress)
        finally:
            task.end()


def _run(task: Task, cfg: RunConfig, out: Path, info: DistInfo, progress: bool) -> Path:
    ckpts, latest = open_run(out, cfg.to_dict(), task.model_type, task.model_config.to_dict(), task.kind,
                             cfg.keep_last, info.is_main)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    _build(task, cfg, info, fresh=latest is None)
    step = 0
    if latest is not None:
        state, meta = CheckpointManager.load(latest, device="cpu")
        _restore(task, state)
        step = meta["step"]
        if info.is_main:
            print(f"resuming from {latest} (step {step})")
    _wrap(task, cfg, info)
    task.begin(step)
    log = JsonlLog(out / "log.jsonl", step) if info.is_main else None
    bar = progress_bar(progress and info.is_main, cfg.max_steps, step, f"train {out.name} ({task.model_type})")
    n = torch.get_num_threads()
    threads = f"{n} CPU thread{'s' * (n != 1)}, --threads N to change" if info.device.type == "cpu" else ""
    eta = Eta(cfg.max_steps, f"train {out.name}", done=step, note=threads,
              write=bar.write if bar is not None else None) if info.is_main else None

    optim = cfg.optim
    peak_lr = optim.lr_for(cfg.batch_size * getattr(cfg, "grad_accum", 1) * info.world)
    bad = torch.zeros((), dtype=torch.bool, device=info.device)  # any non-finite loss since the last check
    skipped = 0
    t0, seen = time.time(), 0
    with GracefulInterrupt() as interrupt:
        while step < cfg.max_steps:
            lr = lr_at(step, peak_lr, optim.warmup_steps, cfg.max_steps, optim.min_lr_ratio)
            set_lr(task.optimizer, lr)
            result = task.step(step, lr)
            logs = result.logs
            if optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(task.model.parameters(), optim.grad_clip)
                logs["grad_norm"] = local_value(norm)
            task.optimizer.step()
            task.optimizer.zero_grad(set_to_none=True)
            task.ema.update(task.model, step)
            bad |= ~result.finite
            skipped += result.skipped
            seen += result.images * info.world
            step += 1
            if eta is not None:
                eta.step()

            # bookkeeping: host syncs only here, every log_every steps and before a checkpoint
            stop = interrupt.requested  # read once: a signal arriving later in this step is seen at the next one
            if info.enabled:  # every rank stops at the same step: agreed at the log steps (they sync anyway)
                stop = (step % cfg.log_every == 0 or step == cfg.max_steps) and any_rank(stop, info)
                if stop:
                    interrupt.join()
            save_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop
            if step % cfg.log_every == 0 or save_now:
                check_finite(bad, logs, step, ckpts.latest(), task.loss_name)
                values = {k: float(v) for k, v in logs.items()}
                if log is not None:
                    log.write(step, {**values, "lr": lr, task.rate_key: seen / max(time.time() - t0, 1e-9),
                                     "skipped_images": float(skipped)})
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k in task.shown})
                t0, seen = time.time(), 0
            if bar is not None:
                bar.update(1)
            task.after_step(step)
            if save_now:
                state = _state(task) if (info.is_main or cfg.fsdp) else None
                if info.is_main:
                    ckpts.save(step, state, task.checkpoint_meta(step))
                barrier(info)
            if stop:
                if info.is_main:
                    print(f"\ninterrupted: saved step {step}; run the same command again to resume")
                break
    if bar is not None:
        bar.close()
    if skipped and info.is_main:
        print(f"skipped {skipped} images that could not be decoded")
    final = out / "final"
    if step >= cfg.max_steps:
        # an FSDP run's EMA gathered into a fresh single-process model, so final/ is what from_pretrained builds
        model = fsdp.final_model(task.ema, info, cfg.fsdp, task.make_model)
        if model is not None:  # the main rank
            try:
                task.save_final(model, final, step)
            except OSError as err:
                if err.errno not in DISK_FULL:
                    raise
                raise ckpts.disk_full(final, err) from None
    barrier(info)
    return final


# ---- what every task uses ---------------------------------------------------------------------------
class LossForward(nn.Module):
    """``forward(*inputs)`` = ``loss(model, *inputs)``: the loss the loop asks for as one module call, so that DDP,
    FSDP and torch.compile wrap exactly that call and own the model's parameters."""

    def __init__(self, model: nn.Module, loss: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *inputs: Any) -> Any:
        return self.loss(self.model, *inputs)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings/position tables and learned tokens (1D or (1,L,D)), nor on
    the parameters whose names hold one of the model's ``no_weight_decay`` fragments."""
    decay, no_decay = [], []
    skip = tuple(getattr(model, "no_weight_decay", ()))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or "pos" in name or "token" in name.split(".")[-1] or any(k in name for k in skip)
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, optim: Any) -> torch.optim.AdamW:
    """The AdamW every task trains its model with (``optim``: an :class:`~textok.train.config.OptimConfig`)."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas)


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``base * min_ratio`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def run_text_states(cfg: Any, out: Path, info: DistInfo, encoder: str, max_length: int, captions: set[str] | None,
                    *, streaming: bool = False, pooled: bool = False, progress: bool = True):
    """A run's caption encoder (``encoder``, ``max_length`` tokens): the one-file cache ``cfg.text_cache`` (default
    ``OUT/text_cache.safetensors``) or the text-state store, as ``cfg.text_store`` says. ``captions`` that can be
    listed are encoded once, up front, by the main process."""
    return open_text_states(encoder, max_length, str(info.device), text_store=cfg.text_store,
                            text_cache=Path(cfg.text_cache) if cfg.text_cache else out / "text_cache.safetensors",
                            streaming=streaming, captions=captions, pooled_model=pooled, is_main=info.is_main,
                            barrier=lambda: barrier(info), progress=progress)


class NonFiniteLoss(TextokError):
    """A loss became NaN/inf; raised before anything is saved, so the last checkpoint stays good."""


def check_finite(bad: torch.Tensor, terms: dict[str, torch.Tensor], step: int, last_checkpoint: Path | None,
                 what: str = "a loss") -> None:
    """Stop if any loss since the last check was NaN/inf (``bad`` is accumulated on the device, no sync)."""
    if bool(bad):
        names = [k for k, v in terms.items() if not math.isfinite(float(v))]
        where = f"the last good checkpoint ({last_checkpoint}) is intact" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteLoss(f"{what} became NaN/inf by step {step} (term {', '.join(names) or '?'}); {where}. "
                            "Lower optim.lr or the loss weights, or use precision=fp32")


__all__ = ["LossForward", "NonFiniteLoss", "StepResult", "Task", "adamw", "check_finite", "lr_at", "param_groups",
           "run_text_states", "set_lr", "train"]
