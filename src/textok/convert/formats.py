"""The table of published formats ``textok convert --from`` reads: one row per format."""

from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn

from .manifest import Variant
from .maskgit import build_maskgit, textok_sampler
from .titok import build_titok


class Format(NamedTuple):
    summary: str  # one line for --help: what the published files are and what textok makes of them
    kind: str  # "tokenizer" | "generator"
    build: Callable[[dict[str, Tensor], Variant], nn.Module]
    sampler: Callable[[Variant], dict] | None = None  # generators: the release's sampler in `textok sample` terms


FORMATS: dict[str, Format] = {
    "titok": Format("1d-tokenizer's TiTok VQ tokenizers S-128, B-64, L-32 (tokenizer_titok_{s128,b64,l32}.bin) "
                    "-> a textok TiTok", "tokenizer", build_titok),
    "titok-maskgit": Format("1d-tokenizer's MaskGIT generators for TiTok L-32, B-64 (BERT) and S-128 (U-ViT) "
                            "(generator_titok_{l32,b64,s128}.bin) -> a textok MaskGIT; needs --tokenizer",
                            "generator", build_maskgit, textok_sampler),
}

__all__ = ["FORMATS", "Format"]
