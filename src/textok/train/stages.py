"""Which loss settings fit a tokenizer's training stage (TiTok's two-stage recipe).

Stage 1 of TiTok (``stage=proxy-codes``) is trained by the model's own cross-entropy against the frozen
MaskGIT-VQGAN's codes; its reconstructions are the VQGAN's decoding of arg-max codes, which carry no
gradient. The loop's pixel losses would therefore train nothing (and a discriminator would learn to tell
VQGAN decodings from photos), so a run that switches them on is refused before anything is built. Stage 2
(``stage=decoder-finetune``) freezes the encoder and quantizer, so it must start from stage 1's weights.
"""

from __future__ import annotations

from ..errors import ConfigError
from .config import TrainConfig


def check_stage_recipe(cfg: TrainConfig, model_cfg) -> None:
    """Refuse pixel losses in stage ``proxy-codes``, and a ``decoder-finetune`` run that does not start from
    a trained tokenizer (it freezes the encoder and quantizer), each with one line naming the fix."""
    stage = getattr(model_cfg, "stage", "pixel")
    if stage == "decoder-finetune" and not cfg.init_from:
        raise ConfigError("stage=decoder-finetune freezes the encoder and quantizer, so it starts from a stage-1 "
                          "tokenizer: set init_from=RUN/final of a stage=proxy-codes run")
    if stage != "proxy-codes":
        return
    loss = cfg.loss
    on = []
    if loss.l2_weight:
        on.append(f"loss.l2_weight={loss.l2_weight}")
    if loss.perceptual != "none" and loss.perceptual_weight > 0:
        on.append(f"loss.perceptual={loss.perceptual}")
    if loss.adversarial.weight > 0:
        on.append(f"loss.adversarial.weight={loss.adversarial.weight}")
    if on:
        raise ConfigError(f"stage=proxy-codes trains on the VQGAN's codes, where {', '.join(on)} would train "
                          "nothing: set loss.l2_weight=0 loss.perceptual=none loss.adversarial.weight=0 "
                          "(the titok-stage1 recipe does)")
