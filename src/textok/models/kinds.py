"""What a model kind declares, in one place: how it is built and saved (its model class), trained (its Task),
sampled (a generator's sampler and the codes it models) and what its codes look like (a tokenizer's
``code_form``). The training loop, the sampling pipeline, the CLI and the applications ask a kind's declaration
(:mod:`textok.models.registry` holds the rows) instead of switching on its name.

A kind's Task is named as ``"module:Class"`` (or given as the class): the model layer does not import the
training layer above it, and the class is imported when a run of that kind starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch
from torch import Tensor, nn

# What a tokenizer's ``code_form`` is and what a generator models, as messages name them.
CODE_FORMS = {"tokens": "continuous tokens", "codes": "flat codes", "scales": "multi-scale codes"}


def _resolve(ref: str | type) -> type:
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """One batch a generator is asked for, everything resolved: a kind's sampler turns it into images."""

    batch: int
    labels: Tensor | None  # (B,) class ids on the device, or None (unconditional / text-to-image)
    text: Any  # the prompts' TextEmbeddings for a text-to-image generator, else None
    decoder_text: list[str] | None  # captions the tokenizer decodes with (None: its decoder reads no text)
    steps: int | None
    cfg_scale: float  # guidance w >= 1 (1 = none)
    sampler: str | None
    options: dict[str, Any]  # the kind's own sampler options, defaults filled in
    generator: torch.Generator
    record: dict[str, Any]  # what training saved beside the generator (latents meta, diffusion config)
    device: torch.device
    precision: str = "auto"
    progress: bool = False
    cuda_graph: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """A tokenizer: images <-> tokens or codes. Its model class answers ``code_form`` / ``code_layout()``."""

    name: str  # the ``model_type`` saved models record
    model: type[nn.Module]  # built from ``model.config_class``; saved and loaded with save/from_pretrained
    task: str | type = "textok.train.tokenizer:TokenizerTask"

    def task_class(self) -> type:
        return _resolve(self.task)


@dataclasses.dataclass(frozen=True)
class GeneratorKind:
    """A generator over a tokenizer's tokens or codes."""

    name: str  # the ``model_type`` saved models record, ``--kind`` on the command line
    label: str  # how messages name it ("DiT")
    model: type[nn.Module]
    task: str | type  # its training Task
    preset: str  # the preset a run trains when no --config is given
    consumes: str  # the tokenizers' ``code_form`` it models (a CODE_FORMS key)
    # (model, tokenizer, request) -> images (B, 3, H, W); runs under no_grad in eval mode
    sample: Callable[[nn.Module, nn.Module, SampleRequest], Tensor]
    # (model, tokenizer, record, fix) -> None, or a one-line TextokError ending in ``fix`` when they do not fit
    check_pair: Callable[[nn.Module, nn.Module, dict[str, Any], str], None]
    default_cfg: float  # guidance for pictures
    eval_cfg: float  # guidance for samples to score (``sample --npz``)
    eval_note: str = ""  # where eval_cfg comes from, for the message that names it
    # model -> the guidance it stores with itself (both for pictures and for scoring), when it stores one
    stored_guidance: Callable[[nn.Module], float] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # its sampler options and their defaults
    controls: str = "--cfg"  # the flags that steer its sampling, for messages
    text_to_image: bool = False  # it can train on captions (``text=true``)
    cuda_graph: bool = False  # it can replay its sampling step from a CUDA graph
    optim: dict[str, Any] | None = None  # its recipe's optimizer (OptimConfig fields) when not the generators' default

    def task_class(self) -> type:
        return _resolve(self.task)


__all__ = ["CODE_FORMS", "GeneratorKind", "SampleRequest", "TokenizerKind"]
