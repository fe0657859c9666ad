"""Pieces every training loop shares: precision, lr schedule, data order, interrupts, logs, param groups."""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import Interrupted, TextokError


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


def stand_in_batch(empty: dict[str, Any], position: int, load: Callable[[int], dict[str, Any]], span: int
                   ) -> dict[str, Any]:
    """A batch to train on at micro-batch ``position``, none of whose images could be decoded (``empty``).

    It is the nearest earlier micro-batch that has images (at the start of a run, the nearest later one),
    searched over ``span`` positions each way (an epoch). Being a pure function of the position, a resumed run
    gets the same stand-in, so resume stays exact; ``skipped`` keeps ``empty``'s count of undecodable images.
    """
    nearest = [*range(position - 1, max(-1, position - 1 - span), -1), *range(position + 1, position + 1 + span)]
    for k in nearest:
        batch = load(k)
        if batch["captions"]:
            return {**batch, "skipped": empty["skipped"]}
    raise TextokError(f"none of the images of {span} micro-batches around micro-batch {position} could be decoded; "
                      "check that the data folder holds images textok can read")


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
    """The first Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second one aborts.

    Schedulers stop jobs with SIGTERM (``kill``, ``timeout``, SLURM preemption, ``docker stop``), so it is
    treated like Ctrl-C. Leaving the block after such a request raises :class:`Interrupted`: the CLI exits with
    130 / 143 instead of 0, so a chained ``train && extract-latents`` does not go on with an unfinished model.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulInterrupt":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever handles them there
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.requested:
            raise Interrupted(signum, f"interrupted again by {signal.Signals(signum).name}: stopped without saving")
        self.requested = True
        self.signum = signum

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        if self.requested and exc_type is None:
            raise Interrupted(self.signum, f"interrupted by {signal.Signals(self.signum).name} after saving a "
                                           "checkpoint")
        return False


def _logged_step(line: str) -> float:
    """The step of a log line; a blank or torn line (a kill mid-write) sorts after every step and is dropped."""
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return math.inf


class JsonlLog:
    """Append-only JSONL metrics log; on resume, entries past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            from ..io import atomic_write_text

            kept = [l for l in path.read_text().splitlines() if _logged_step(l) <= resume_step]
            atomic_write_text(path, "".join(l + "\n" for l in kept))
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
    from ..io import read_json

    meta = read_json(latest / "meta.json", f"checkpoint {latest} (meta.json)")
    if meta.get("model_type") != model_type:
        raise TextokError(f"{latest} is a checkpoint of a {meta.get('model_type')!r} {kind}, not {model_type!r}; "
                          "use another --out or the same model")
    diff = config_diff(meta["model_config"], json.loads(json.dumps(model_config)))  # as saved: tuples are lists
    if diff:
        raise TextokError(f"cannot resume {latest}: the {kind} config differs ({'; '.join(diff)}); "
                          "use another --out or the original config")


# Training settings a resumed run cannot honour: they decide which images (and captions) each step sees, or they
# live in state the checkpoint restores (Adam's betas and weight decay come back with the optimizer, the
# discriminator's shape with its weights). Everything else may change on resume and is reported.
FIXED_ON_RESUME = ("batch_size", "grad_accum", "seed", "data.source", "data.train_size", "data.seed",
                   "data.captions_file", "data.caption_bank", "data.captions_per_image", "optim.betas",
                   "optim.weight_decay", "loss.discriminator")


def resume_changes(saved: dict[str, Any], current: dict[str, Any], step: int) -> tuple[list[str], list[str]]:
    """(changes that are refused, changes that are allowed) between a checkpoint's training settings and this
    run's, each as ``"key: old -> new"``. Keys the checkpoint does not know (added to textok later) are skipped."""
    from ..hub import flatten

    old, new = flatten(saved), flatten(current)
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  (JSON has no tuples)
    changed = {k: (old[k], new.get(k)) for k in old if k in new and as_list(old[k]) != as_list(new[k])}
    refused, allowed = [], []
    for key, (a, b) in sorted(changed.items()):
        line = f"{key}: {a!r} -> {b!r}"
        gan_toggled = key == "loss.adversarial.weight" and (float(a) > 0) != (float(b) > 0)
        (refused if key in FIXED_ON_RESUME or gan_toggled else allowed).append(line)
    if isinstance(new.get("max_steps"), int) and new["max_steps"] < step:
        refused.append(f"max_steps: {new['max_steps']} is below the checkpoint's step {step}")
    return refused, allowed


def open_run(out: Path, train_config: dict[str, Any], model_type: str, model_config: dict[str, Any], kind: str,
             keep_last: int, is_main: bool):
    """A run directory's checkpoint manager and the checkpoint to resume from, with ``train_config.json``
    written by the main process. Call it holding the run's lock (:func:`textok.train.rundir.run_lock`).

    The main process first removes what a killed save left behind (temporary checkpoint directories and
    files). Resuming takes the newest checkpoint that is intact (a damaged one is named and skipped); it is
    refused when the checkpoint was written for another model, or when settings changed that a resumed run
    cannot honour; the settings that did change are printed.
    """
    from ..io import atomic_write_text, remove_stale
    from .checkpoint import CheckpointManager
    ckpts = CheckpointManager(out / "checkpoints", keep_last=keep_last)
    if is_main:
        for directory in (out, out / "checkpoints"):
            for path in remove_stale(directory):
                print(f"removed {path}, left by an interrupted save")
    latest, damaged = ckpts.latest_intact()
    if damaged and latest is None:
        raise TextokError(f"no checkpoint in {ckpts.root} can be read ({damaged[0]}); move that folder away to "
                          "start the run again, or use another --out")
    if latest is not None:
        check_resume_compatible(latest, model_type, model_config, kind)
        meta = CheckpointManager.verify(latest)
        refused, allowed = resume_changes(meta.get("train_config") or {}, train_config, int(meta["step"]))
        if refused:
            raise TextokError(f"cannot resume {latest} with these settings ({'; '.join(refused)}): a resumed run "
                              "must see the same data in the same order; use the original values, or another --out")
        if is_main:
            for line in damaged:
                print(f"skipping a damaged checkpoint: {line}")
            if allowed:
                print(f"resuming with changed settings: {'; '.join(allowed)}")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(train_config, indent=2))
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
