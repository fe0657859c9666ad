"""A toy generator kind, the way a new kind is added: its model file (this module) plus one registry row.

It learns one token set per class (the class mean of the normalised latents) and samples it plus seeded noise."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from textok.config import Config
from textok.errors import TextokError
from textok.hub import PretrainedMixin
from textok.models.kinds import GeneratorKind, SampleRequest
from textok.train.generator import GeneratorTask


@dataclasses.dataclass
class ToyConfig(Config):
    num_tokens: int = 4
    in_channels: int = 4
    num_classes: int = 8
    noise: float = 0.1


ToyConfig.register_preset("toy-tiny")(ToyConfig)


class Toy(PretrainedMixin, nn.Module):
    config_class = ToyConfig
    model_type = "toy"

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.means = nn.Embedding(config.num_classes, config.num_tokens * config.in_channels)

    def forward(self, labels: Tensor) -> Tensor:
        c = self.config
        return self.means(labels).view(-1, c.num_tokens, c.in_channels)


class ToyTask(GeneratorTask):
    def configure(self, text_dim: int) -> ToyConfig:
        m = self.meta
        return ToyConfig.resolve(self.cfg.model_name).override(self.cfg.model_overrides).override(
            {"num_tokens": m["num_tokens"], "in_channels": m["channels"], "num_classes": max(1, m["num_classes"])})

    def loss(self, model: Toy, x0: Tensor, labels: Tensor) -> dict[str, Tensor]:
        mse = (model(labels) - x0).pow(2).mean()
        return {"loss": mse, "mse": mse.detach()}

    def inputs(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple:
        device = self.info.device
        return batch["latents"].to(device), batch["label"].to(device).clamp_min(0)


def sample_images(model: Toy, tok: nn.Module, req: SampleRequest) -> Tensor:
    labels = req.labels if req.labels is not None else torch.zeros(req.batch, dtype=torch.long, device=req.device)
    z = model(labels)
    z = z + req.options["noise"] * torch.randn(z.shape, generator=req.generator, device=req.device)
    meta = req.record["latents_meta"]
    mean, std = (torch.tensor(meta[k], dtype=torch.float32, device=req.device) for k in ("mean", "std"))
    return tok.decode(z * std + mean, req.decoder_text)


def check_tokenizer(model: Toy, tok: nn.Module, record: dict, fix: str) -> None:
    c, tc = model.config, tok.config
    if (c.num_tokens, c.in_channels) != (tc.num_tokens, tc.token_channels):
        raise TextokError(f"the toy makes ({c.num_tokens}, {c.in_channels}) tokens, the tokenizer decodes "
                          f"({tc.num_tokens}, {tc.token_channels}); {fix}")


TOY_KIND = GeneratorKind("toy", "Toy", Toy, ToyTask, preset="toy-tiny", consumes="tokens", sample=sample_images,
                         check_pair=check_tokenizer, default_cfg=1.0, eval_cfg=1.0, options={"noise": 0.1},
                         controls="--cfg")
