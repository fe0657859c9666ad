"""Sampling: a trained generator + its tokenizer -> images (a grid PNG, or an ``.npz`` for evaluation).

How a generator samples is its kind's (:mod:`textok.models.kinds`: DiT, MaskGIT, VAR each declare a sampler, the
codes they model, their guidance defaults and their own options); this module checks the request, seeds it and
decodes. A tokenizer that reads text in its decoder gets, for a class-conditional sample, a caption drawn
(seeded) from the class's caption bank (the paper's recipe); for text-to-image, the prompt itself.

Guidance: ``cfg`` must be >= 1 for every kind (1 = no guidance; below 1 extrapolates towards the
unconditional model, which is not what a user asking for a class or a prompt wants).

Determinism: batch ``b`` of a run draws every random number from a generator seeded by (seed, b), and
sample ``i`` picks its decoder caption with a generator seeded by (seed, i): the same seed and batch size
give the same images.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from ..data.images import save_image
from ..devices import resolve_device
from ..distributed import barrier
from ..errors import TextokError
from ..models.kinds import CODE_FORMS, SampleRequest
from ..models.registry import GENERATOR_KINDS, generator_kind, load_generator, load_tokenizer
from ..text.banks import CaptionBank
from ..text.encoders import load_text_encoder
from .latents import BANK

NPZ_PRECISION = "fp32"  # `sample --npz` (FID samples) runs in fp32 unless told otherwise, as DiT's FID sampler


class GenerationPipeline:
    """A generator and a tokenizer checked to fit each other, with everything needed to decode samples."""

    def __init__(self, generator: str | Path, tokenizer: str | Path | None = None, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.generator_dir = Path(generator)
        model, record = load_generator(generator)
        self.model = model.eval().to(self.device)
        self.kind: str = record["model_type"]
        self.spec = generator_kind(self.kind)  # what this kind declares: its sampler, codes, guidance, options
        self.record = record
        self.meta: dict[str, Any] = record["latents_meta"]
        self.tokenizer_dir = Path(tokenizer) if tokenizer else Path(self.meta["tokenizer_dir"])
        self.tok = load_tokenizer(self.tokenizer_dir).eval().to(self.device)
        self._check_pair()
        self.bank = self._load_bank()
        self._text_encoder = None

    # ---- what this generator accepts ---------------------------------------------------------------
    def default_cfg(self, for_eval: bool = False) -> float:
        """The guidance used when none is given: what the model stores with itself (a MaskGIT's sampler), else
        the kind's default for pictures or, ``for_eval``, for samples to score (``sample --npz``)."""
        if self.spec.stored_guidance is not None:
            return float(self.spec.stored_guidance(self.model))
        return self.spec.eval_cfg if for_eval else self.spec.default_cfg

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @property
    def is_text_to_image(self) -> bool:
        return self.spec.text_to_image and self.model.config.text_dim > 0

    @property
    def decoder_needs_text(self) -> bool:
        return bool(self.tok.config.text_in_decoder)

    def _check_pair(self) -> None:
        trained_with = f"use the tokenizer it was trained with ({self.meta['tokenizer_dir']})"
        form, wanted = self.tok.code_form, self.spec.consumes
        if form != wanted:
            raise TextokError(f"the generator {self.generator_dir} is a {self.spec.label} over {CODE_FORMS[wanted]}, "
                              f"but the tokenizer {self.tokenizer_dir} is a {self.tok.model_type} with "
                              f"{CODE_FORMS[form]}; {trained_with}")
        self.spec.check_pair(self.model, self.tok, self.record, f"the generator is {self.generator_dir}, the "
                                                                 f"tokenizer {self.tokenizer_dir}; {trained_with}")

    def _load_bank(self) -> CaptionBank | None:
        self.bank_path: Path | None = None
        for path in (self.generator_dir / BANK, Path(self.meta.get("latents_dir", "")) / BANK):
            if path.is_file():
                self.bank_path = path
                return CaptionBank.load(path)
        return None

    def bank_summary(self) -> str | None:
        """Which captions the decoder draws from, in one line (None when it decodes without text)."""
        if not self.decoder_needs_text or self.bank is None:
            return None
        data = self.meta.get("dataset", {})
        where = f" of the {data.get('split')} split of {data.get('data')}" if data.get("data") else ""
        total = sum(len(v) for v in self.bank.captions.values())
        return (f"decoder captions drawn per class from the caption bank {self.bank_path} ({total} captions{where}, "
                f"{len(self.bank.captions)} classes)")

    def check_request(self, labels: list[int] | None, prompts: list[str] | None, cfg_scale: float) -> None:
        """Refuse requests this generator cannot serve, with what to do instead."""
        if not math.isfinite(cfg_scale) or cfg_scale < 1.0:
            raise TextokError(f"--cfg {cfg_scale} must be >= 1 (1 = no guidance; larger = stronger guidance)")
        if prompts is not None:
            if not self.is_text_to_image:
                raise TextokError(f"the generator {self.generator_dir} is not text-to-image "
                                  f"({'class-conditional' if self.num_classes else 'unconditional'}); "
                                  f"{'pass --class K' if self.num_classes else 'drop --caption'}")
            for p in prompts:
                if not isinstance(p, str) or not p.strip():
                    raise TextokError("an empty prompt: give --caption a non-empty text")
        elif self.is_text_to_image:
            raise TextokError(f"the generator {self.generator_dir} is text-to-image: pass --caption \"...\"")
        if labels is not None:
            if self.num_classes == 0:
                raise TextokError(f"the generator {self.generator_dir} has no classes; "
                                  f"{'pass --caption' if self.is_text_to_image else 'drop --class'}")
            bad = [k for k in labels if not 0 <= int(k) < self.num_classes]
            if bad:
                raise TextokError(f"class {bad[0]} is out of range: this generator knows classes 0..{self.num_classes - 1}")
        if self.decoder_needs_text and prompts is None and self.bank is None:
            raise TextokError(f"the tokenizer {self.tokenizer_dir} decodes with text but no caption bank was found "
                              f"beside {self.generator_dir} or its latents")

    # ---- one batch ----------------------------------------------------------------------------------
    def _text_states(self, prompts: list[str]):
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.meta["text_encoder"], self.meta.get("text_max_length", 64),
                                                   str(self.device))
        return self._text_encoder.encode(prompts).to(self.device)

    def decoder_captions(self, labels: list[int] | None, prompts: list[str] | None, seed: int, first: int,
                         batch: int, exclude: list[set[str]] | None = None) -> list[str] | None:
        """Captions the tokenizer decodes with: the prompts, or (seeded) draws from each class's bank.

        ``exclude[i]``: captions sample i must not be decoded with (the paper's protocol: a sample that stands
        for a reference image is decoded with a caption of its class that is not one of that image's own)."""
        if not self.decoder_needs_text:
            return None
        if prompts is not None:
            return list(prompts)
        out = []
        for i, label in enumerate(labels if labels is not None else [None] * batch):
            rng = random.Random((seed * 1_000_003 + first + i) & 0xFFFFFFFFFFFF)
            banned = exclude[i] if exclude is not None else frozenset()
            if label is None:
                pool = [c for caps in self.bank.captions.values() for c in caps if c not in banned]
                out.append(rng.choice(pool or [c for caps in self.bank.captions.values() for c in caps]))
            else:
                out.append(self.bank.sample(int(label), rng, exclude=banned))
        return out

    @torch.no_grad()
    def generate(self, labels: list[int] | None = None, prompts: list[str] | None = None, *, n: int | None = None,
                 steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None,
                 seed: int = 0, first: int = 0, progress: bool = False, cuda_graph: bool = False,
                 precision: str = "auto", exclude_captions: list[set[str]] | None = None, **options: Any) -> Tensor:
        """One batch of images (B, 3, H, W) in [-1, 1]: one per label / prompt (or ``n`` unconditional).

        ``first`` is the global index of the batch's first sample (it seeds the decoder captions).
        ``cuda_graph``: replay the DiT's step from a CUDA graph (GPU only). ``precision``: "auto" (bf16 autocast
        on a GPU), "bf16" or "fp32" (for evaluation runs). ``exclude_captions[i]``: captions sample i is not
        decoded with (see :meth:`decoder_captions`). ``options``: the kind's own sampler options (MaskGIT:
        ``temperature``, ``temperature_schedule``, ``softmax_annealing``, ``guidance_schedule``,
        ``guidance_exponent``, each defaulting to the model's stored sampler, see :meth:`MaskGIT.generate`; VAR:
        ``top_k``, ``top_p``, defaulting to the model's stored sampler (the paper's 750 and 0.95 unless converted from
        a release with its own), see :meth:`VAR.generate`).
        """
        cfg_scale = self.default_cfg() if cfg_scale is None else float(cfg_scale)
        self.check_request(labels, prompts, cfg_scale)
        B = len(labels) if labels is not None else len(prompts) if prompts is not None else int(n or 0)
        if B < 1:
            raise TextokError("nothing to sample: give at least one class, prompt or sample")
        g = torch.Generator(device=self.device).manual_seed((seed * 1_000_003 + first) % (2**63 - 1))
        dec_text = self.decoder_captions(labels, prompts, seed, first, B, exclude_captions)
        if cuda_graph and self.device.type != "cuda":
            raise TextokError("--cuda-graphs needs a CUDA device; drop it on a CPU")
        if precision not in ("auto", "bf16", "fp32"):
            raise TextokError(f"precision {precision!r} must be auto, bf16 or fp32")
        options = self._options(options)
        if cuda_graph and not self.spec.cuda_graph:
            able = " and ".join(k.label for k in GENERATOR_KINDS.values() if k.cuda_graph)
            raise TextokError(f"--cuda-graphs applies to {able} sampling, not {self.spec.label}; drop it")
        request = SampleRequest(
            batch=B, labels=torch.tensor(labels, dtype=torch.long, device=self.device) if labels is not None else None,
            text=self._text_states(list(prompts)) if prompts is not None else None, decoder_text=dec_text,
            steps=steps, cfg_scale=cfg_scale, sampler=sampler, options=options, generator=g, record=self.record,
            device=self.device, precision=precision, progress=progress, cuda_graph=cuda_graph)
        images = self.spec.sample(self.model, self.tok, request)
        return images.float().clamp(-1, 1)

    def _options(self, given: dict[str, Any]) -> dict[str, Any]:
        """The kind's own sampler options: those given (None = not given) over its defaults; another kind's
        option is refused naming whose it is."""
        known = {o for kind in GENERATOR_KINDS.values() for o in kind.options}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TextokError(f"unknown sampling option(s) {', '.join(unknown)}")
        given = {k: v for k, v in given.items() if v is not None}
        foreign = sorted(set(given) - set(self.spec.options))
        if foreign:
            owner = next(kind for kind in GENERATOR_KINDS.values() if foreign[0] in kind.options)
            raise TextokError(f"{', '.join(foreign)} are {owner.label} sampling options; a {self.spec.label} samples "
                              f"with {self.spec.controls}")
        defaults = {k: v for k, v in self.spec.options.items() if v is not None}
        return {**defaults, **given}

    # ---- many batches ------------------------------------------------------------------------------
    def iter_samples(self, total: int, labels: list[int] | None = None, prompts: list[str] | None = None,
                     batch_size: int = 64, progress: bool = False, rank: int = 0, world: int = 1,
                     exclude_captions: list[set[str]] | None = None,
                     **kw: Any) -> Iterator[tuple[Tensor, list[int] | None]]:
        """``total`` images in batches; sample i gets ``labels[i % len]`` / ``prompts[i % len]`` (and is not
        decoded with a caption in ``exclude_captions[i % len]``).

        With ``world`` > 1 only batches ``rank``, ``rank + world``, ... are drawn. A batch is seeded by its first
        global index, so the union over the ranks is exactly the single-process output.
        """
        if total < 1 or batch_size < 1:
            raise TextokError(f"--num-samples ({total}) and --batch-size ({batch_size}) must be positive")
        firsts = list(range(0, total, batch_size))[rank::world]
        bar = None
        if progress:
            from ..progress import progress_bar

            mine = sum(min(batch_size, total - f) for f in firsts)
            bar = progress_bar(total=mine, desc=f"sampling ({self.kind})", unit="img")
        for first in firsts:
            ids = range(first, min(total, first + batch_size))
            lab = [labels[i % len(labels)] for i in ids] if labels else None
            pro = [prompts[i % len(prompts)] for i in ids] if prompts else None
            exc = [exclude_captions[i % len(exclude_captions)] for i in ids] if exclude_captions else None
            images = self.generate(lab, pro, n=len(ids), first=first, exclude_captions=exc, **kw)
            if bar is not None:
                bar.update(len(ids))
            yield images, lab
        if bar is not None:
            bar.close()

    def default_labels(self) -> list[int] | None:
        """Every class in turn for a class-conditional generator (balanced samples), else None."""
        return list(range(self.num_classes)) if self.num_classes > 0 else None


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded like ``save_image``."""
    return images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


def write_npz(path: str | Path, batches: Iterator[tuple[Tensor, list[int] | None]], total: int) -> Path:
    """Stream batches into ``path`` (``arr_0``: uint8 NHWC; ``arr_1``: int64 labels when known), atomically.

    The array is written member-by-member into the zip, so memory holds one batch, not the whole set.
    """
    return _write_uint8_npz(path, ((to_uint8_nhwc(images), lab) for images, lab in batches), total)


def write_npz_distributed(pipe: GenerationPipeline, path: str | Path, total: int, labels: list[int] | None,
                          prompts: list[str] | None, batch_size: int, info: Any, progress: bool = False,
                          **kw: Any) -> Path:
    """:func:`write_npz` shared by the processes of a torchrun job: each draws every ``world``-th batch into a
    part file beside ``path``; rank 0 then joins the parts in order (the result equals a single process's)."""
    if not info.enabled:
        return write_npz(path, pipe.iter_samples(total, labels, prompts, batch_size=batch_size, progress=progress,
                                                 **kw), total)
    path = Path(path)
    parts = path.with_name(f".{path.name}.parts")
    parts.mkdir(parents=True, exist_ok=True)
    mine = pipe.iter_samples(total, labels, prompts, batch_size=batch_size, progress=progress and info.is_main,
                             rank=info.rank, world=info.world, **kw)
    for k, (images, lab) in enumerate(mine):
        batch = info.rank + k * info.world
        np.save(parts / f"{batch:08d}.npy", to_uint8_nhwc(images))
        if lab is not None:
            np.save(parts / f"{batch:08d}.labels.npy", np.asarray(lab, dtype=np.int64))
    barrier(info)
    if info.is_main:
        def joined() -> Iterator[tuple[np.ndarray, list[int] | None]]:
            for batch in range(math.ceil(total / batch_size)):
                lab_file = parts / f"{batch:08d}.labels.npy"
                yield np.load(parts / f"{batch:08d}.npy"), (np.load(lab_file).tolist() if lab_file.is_file() else None)

        try:
            _write_uint8_npz(path, joined(), total)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    barrier(info)
    return path


def _write_uint8_npz(path: str | Path, arrays: Iterator[tuple[np.ndarray, list[int] | None]], total: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    labels: list[int] = []
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            member = None
            for arr, lab in arrays:
                if member is None:
                    member = zf.open("arr_0.npy", "w", force_zip64=True)
                    np.lib.format.write_array_header_2_0(
                        member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                 "shape": (total, *arr.shape[1:])})
                member.write(np.ascontiguousarray(arr).tobytes())
                written += arr.shape[0]
                if lab is not None:
                    labels.extend(int(k) for k in lab)
            if member is not None:
                member.close()
            if written != total:
                raise TextokError(f"wrote {written} samples, expected {total}")
            if labels:
                with zf.open("arr_1.npy", "w") as f:
                    np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def sample_grid(pipe: GenerationPipeline, out: str | Path, labels: list[int] | None = None,
                prompts: list[str] | None = None, n: int = 8, seed: int = 0, **kw: Any) -> Path:
    """A PNG with one row of ``n`` samples per class / prompt (or one row of unconditional samples)."""
    rows = labels if labels is not None else prompts if prompts is not None else [None]
    lab = [k for k in labels for _ in range(n)] if labels is not None else None
    pro = [p for p in prompts for _ in range(n)] if prompts is not None else None
    images = pipe.generate(lab, pro, n=n * len(rows), seed=seed, **kw)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.cpu(), str(out), nrow=n)
    return out


__all__ = ["GenerationPipeline", "sample_grid", "write_npz", "write_npz_distributed", "to_uint8_nhwc",
           "NPZ_PRECISION"]
