"""The page's generators: each ``--generator`` directory loaded once, described, and sampled on request.

A generator decodes through the tokenizer it was trained on; the page puts its samples beside that tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ...data.scenes import SHAPES
from ...errors import TextokError
from ...generate.sampling import GenerationPipeline
from .names import model_name, one_line
from .pictures import png_data_url, to_uint8

MAX_SAMPLES = 8
MAX_CAPTION_CHARS = 2000  # longer captions and prompts are refused before any work (encoders keep 64-512 tokens)


def check_caption(caption: str, what: str = "caption") -> str:
    """The caption stripped, or a one-line refusal when it is too long to be worth encoding."""
    caption = (caption or "").strip()
    if len(caption) > MAX_CAPTION_CHARS:
        raise TextokError(f"the {what} has {len(caption)} characters; the limit is {MAX_CAPTION_CHARS}: shorten it")
    return caption


@dataclasses.dataclass
class LoadedGenerator:
    directory: str
    pipe: GenerationPipeline | None = None
    error: str | None = None

    def info(self, tokenizer_name: str | None = None) -> dict[str, Any]:
        """``tokenizer_name``: the page's name of its tokenizer when that tokenizer is loaded too."""
        p = self.pipe
        if p is None:
            return {"name": model_name(self.directory), "directory": self.directory, "error": self.error}
        names = list(SHAPES) if p.meta.get("dataset", {}).get("data") == "scenes" and p.num_classes == len(SHAPES) \
            else [f"class {k}" for k in range(p.num_classes)]
        return {"name": model_name(p.generator_dir), "directory": self.directory, "error": None, "kind": p.kind,
                "classes": names[: p.num_classes], "text_to_image": p.is_text_to_image, "cfg": p.default_cfg(),
                "tokenizer": tokenizer_name or model_name(p.tokenizer_dir), "tokenizer_loaded": tokenizer_name is not None,
                "max_samples": MAX_SAMPLES}

    def generate(self, text_lock: threading.Lock, label: int | None = None, prompt: str | None = None, n: int = 4,
                 seed: int = 0, cfg: float | None = None, steps: int | None = None) -> dict[str, Any]:
        """``n`` class- or prompt-conditional samples (``n`` is 1 .. MAX_SAMPLES: 0 is refused, not replaced).

        ``text_lock`` is held while a generator that reads text samples: text encoders are shared and a Hugging
        Face tokenizer is not safe to call from two threads at once."""
        p = self.pipe
        if p is None:
            raise TextokError(f"generator {self.directory} did not load: {self.error}")
        if not 1 <= n <= MAX_SAMPLES:
            raise TextokError(f"ask for 1 to {MAX_SAMPLES} samples (n={n})")
        if steps is not None and not 1 <= steps <= 1000:
            raise TextokError("steps must be between 1 and 1000 (empty: the generator's default)")
        if not 0 <= seed < 2**63:
            raise TextokError("the seed must be a whole number from 0 to 2^63 - 1")
        labels = prompts = None
        if p.is_text_to_image:
            prompt = check_caption(prompt or "", "prompt")
            if not prompt:
                raise TextokError("this generator is text-to-image: type a prompt")
            prompts = [prompt] * n
        elif p.num_classes:
            if label is None:
                raise TextokError("choose a class")
            labels = [int(label)] * n
        t0 = time.perf_counter()
        reads_text = p.is_text_to_image or p.decoder_needs_text
        with (text_lock if reads_text else contextlib.nullcontext()), torch.inference_mode():
            images = p.generate(labels, prompts, n=n, steps=steps, cfg_scale=cfg, seed=seed)
            captions = p.decoder_captions(labels, prompts, seed, 0, n)
        return {"images": [png_data_url(to_uint8(x)) for x in images], "captions": captions,
                "ms": round((time.perf_counter() - t0) * 1000, 1)}


def load_generator(directory: str | Path) -> LoadedGenerator:
    """A generator directory -> a loaded pipeline (on the CPU), or the reason it did not load (never raises)."""
    directory = str(directory)
    try:
        return LoadedGenerator(directory, GenerationPipeline(directory, device="cpu"))
    except TextokError as err:
        return LoadedGenerator(directory, error=one_line(err))
    except Exception as err:  # noqa: BLE001 - a broken file must not stop the server; say what it was
        return LoadedGenerator(directory, error=f"{directory} could not be loaded ({type(err).__name__}: {one_line(err)})")


__all__ = ["LoadedGenerator", "load_generator", "check_caption", "MAX_SAMPLES", "MAX_CAPTION_CHARS"]
