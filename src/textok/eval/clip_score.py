"""CLIP score of images against captions, with a ``transformers`` CLIP model from a local directory.

Definition (torchmetrics ``CLIPScore``): per pair ``100 * cos(E_img, E_txt)`` of the projected CLIP
embeddings; the aggregate is ``max(mean, 0)``. :meth:`ClipScorer.scores` returns the per-pair
``100 * max(cos, 0)`` (Hessel et al.'s per-image clamp); for real CLIP models cosines are positive and
both agree.

Image preprocessing is done in torch (no image-processor download): [-1, 1] -> [0, 1], bicubic resize
of the shorter side to the model's image size (antialiased), centre crop, CLIP mean/std normalisation.
Mean, std and sizes are read from ``preprocessor_config.json`` in the model folder when present. Text
goes through the tokenizer saved in the folder, truncated to the model's maximum text length.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TextokError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size_value(v: object, default: int) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in v:
                return int(v[key])
    return default


class ClipScorer(nn.Module):
    """CLIP model + tokenizer + torch preprocessing; computes CLIP scores for (image, caption) pairs."""

    def __init__(self, model: nn.Module, tokenizer: object, image_size: int | None = None,
                 crop_size: int | None = None, mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                 std: tuple[float, ...] = OPENAI_CLIP_STD) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        vision_size = int(model.config.vision_config.image_size)
        self.image_size = image_size or vision_size
        self.crop_size = crop_size or vision_size
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ClipScorer":
        """Load ``CLIPModel`` and its tokenizer from a local folder (nothing is downloaded)."""
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise TextokError(f"no CLIP model at {p} (config.json missing); save a transformers CLIPModel and its "
                              "tokenizer there (e.g. openai/clip-vit-large-patch14 downloaded elsewhere)")
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(p), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TextokError(f"cannot load the CLIP model/tokenizer from {p}: {str(e).splitlines()[0]}") from None
        kwargs: dict = {}
        pre = p / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            if "size" in cfg:
                kwargs["image_size"] = _size_value(cfg["size"], 0) or None
            if "crop_size" in cfg:
                kwargs["crop_size"] = _size_value(cfg["crop_size"], 0) or None
            if "image_mean" in cfg:
                kwargs["mean"] = tuple(float(v) for v in cfg["image_mean"])
            if "image_std" in cfg:
                kwargs["std"] = tuple(float(v) for v in cfg["image_std"])
        return cls(model, tokenizer, **kwargs)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised (B, 3, crop, crop) CLIP pixel values."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise TextokError(f"CLIP score expects RGB images (B, 3, H, W); got {tuple(images.shape)}")
        x = (images.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        nh, nw = max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - self.crop_size) // 2, (nw - self.crop_size) // 2
        x = x[:, :, top:top + self.crop_size, left:left + self.crop_size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Unit-norm projected image embeddings (B, E)."""
        pixels = self.preprocess(images.to(self.mean.device))
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        """Unit-norm projected text embeddings (B, E)."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = self.mean.device
        out = self.model.text_model(input_ids=tok["input_ids"].to(device),
                                    attention_mask=tok["attention_mask"].to(device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def raw_scores(self, images: Tensor, texts: list[str]) -> Tensor:
        """Per-pair ``100 * cos`` (unclamped), shape (B,)."""
        if len(texts) != images.shape[0]:
            raise TextokError(f"CLIP score needs one caption per image; got {images.shape[0]} images and "
                              f"{len(texts)} captions")
        return 100.0 * (self.embed_images(images) * self.embed_texts(texts)).sum(dim=-1)

    def scores(self, images: Tensor, texts: list[str]) -> Tensor:
        """Per-pair CLIP score ``100 * max(cos, 0)``, shape (B,)."""
        return self.raw_scores(images, texts).clamp_min(0)

    def forward(self, images: Tensor, texts: list[str]) -> Tensor:
        """Aggregate CLIP score of a batch, torchmetrics style: ``max(mean(100 * cos), 0)``."""
        return self.raw_scores(images, texts).mean().clamp_min(0)


class ClipScoreAccumulator:
    """Running CLIP score over many batches (sum of ``100 * cos`` and count; torchmetrics aggregate)."""

    def __init__(self, scorer: ClipScorer) -> None:
        self.scorer = scorer
        self.total = 0.0
        self.count = 0

    def update(self, images: Tensor, texts: list[str]) -> None:
        s = self.scorer.raw_scores(images, texts)
        self.total += float(s.double().sum())
        self.count += int(s.numel())

    def compute(self) -> float:
        if self.count == 0:
            raise TextokError("CLIP score: no image/caption pairs were added")
        return max(self.total / self.count, 0.0)
