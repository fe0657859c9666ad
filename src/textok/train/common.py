"""Pieces every training loop shares: precision, lr schedule, data order, interrupts, logs, param groups."""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import TextokError


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (or when asked), nothing (fp32) otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``base * min_ratio`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings/position tables and learned tokens (1D or (1,L,D))."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "pos" in name or "token" in name.split(".")[-1] else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_indices(n: int, global_batch: int, rank: int, per_rank: int, seed: int, start: int) -> Iterator[list[int]]:
    """Index lists for micro-batch ``start``, ``start+1``, ... of this rank, a pure function of the position.

    Each epoch is a fresh permutation (seeded by ``seed`` and the epoch); the last partial global batch is
    dropped so every rank gets equal shares. Resuming at micro-batch k yields exactly what k would have been.
    """
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise TextokError(f"the dataset has {n} images, fewer than one global batch of {global_batch}: "
                          "lower batch_size or use more data")
    k = start
    perm, perm_epoch = None, -1
    while True:
        epoch, pos = divmod(k, per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
            perm_epoch = epoch
        first = pos * global_batch + rank * per_rank
        yield perm[first : first + per_rank]
        k += 1


def pick_captions(captions: list[list[str]], indices: list[int], seed: int, step: int, train: bool = True) -> list[str]:
    """One caption per image: random per (seed, step, image) in training, the first one in evaluation."""
    if not train:
        return [c[0] for c in captions]
    out = []
    for caps, idx in zip(captions, indices):
        out.append(caps[random.Random(hash((seed, step, idx)) & 0xFFFFFFFF).randrange(len(caps))])
    return out


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar over training steps (``None`` when disabled, e.g. on non-main ranks)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


class GracefulInterrupt:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "GracefulInterrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class JsonlLog:
    """Append-only JSONL metrics log; on resume, entries past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            path.write_text("".join(l + "\n" for l in kept))
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional

            self._tb = SummaryWriter(str(path.parent / "tb"))
        except Exception:
            self._tb = None

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(f"{v:.6g}") for k, v in values.items()}}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)


class NonFiniteLoss(TextokError):
    """A loss became NaN/inf; raised before anything is saved, so the last checkpoint stays good."""


def check_finite(bad: torch.Tensor, terms: dict[str, torch.Tensor], step: int, last_checkpoint: Path | None,
                 what: str = "a loss") -> None:
    """Stop if any loss since the last check was NaN/inf (``bad`` is accumulated on the device, no sync)."""
    if bool(bad):
        import math

        names = [k for k, v in terms.items() if not math.isfinite(float(v))]
        where = f"the last good checkpoint ({last_checkpoint}) is intact" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteLoss(f"{what} became NaN/inf by step {step} (term {', '.join(names) or '?'}); {where}. "
                            "Lower optim.lr or the loss weights, or use precision=fp32")


def check_resume_compatible(latest: Path, model_type: str, model_config: dict[str, Any], kind: str = "model") -> None:
    """Refuse to resume a checkpoint written for another model type or config, naming what differs."""
    from ..hub import config_diff

    meta = json.loads((latest / "meta.json").read_text())
    if meta.get("model_type") != model_type:
        raise TextokError(f"{latest} is a checkpoint of a {meta.get('model_type')!r} {kind}, not {model_type!r}; "
                          "use another --out or the same model")
    diff = config_diff(meta["model_config"], json.loads(json.dumps(model_config)))  # as saved: tuples are lists
    if diff:
        raise TextokError(f"cannot resume {latest}: the {kind} config differs ({'; '.join(diff)}); "
                          "use another --out or the original config")


def open_run(out: Path, train_config: dict[str, Any], model_type: str, model_config: dict[str, Any], kind: str,
             keep_last: int, is_main: bool):
    """A run directory's checkpoint manager and latest checkpoint (refused when it was written for another
    model), with ``train_config.json`` written by the main process."""
    from .checkpoint import CheckpointManager

    ckpts = CheckpointManager(out / "checkpoints", keep_last=keep_last)
    latest = ckpts.latest()
    if latest is not None:
        check_resume_compatible(latest, model_type, model_config, kind)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(train_config, indent=2))
    return ckpts, latest


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])
