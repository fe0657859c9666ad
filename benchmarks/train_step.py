"""Images/s and MFU of a full tokenizer training step (all losses), for any preset.

One step = the tokenizer update (ℓ2 + perceptual + GAN generator term, forward + backward + AdamW + EMA)
and the discriminator update (real/fake + LeCAM, forward + backward + AdamW), exactly the functions the
training loop calls (``generator_losses`` / ``discriminator_losses``). FLOPs are counted once with
``torch.utils.flop_counter`` over a whole step (so MFU includes the perceptual and discriminator networks),
as 2 × multiply-adds. Text embeddings are random tensors of the text encoder's width (the encoder is frozen
and its outputs are cached during training, so it is not part of the step).

    python benchmarks/train_step.py --preset textok-b-256-64 --no-text --batch 64      # the TiTok B-64 shape
    python benchmarks/train_step.py --preset textok-tiny --steps 3                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, peak_flops, print_table, time_it, write_json  # noqa: E402

from textok.models.registry import resolve_tokenizer_config  # noqa: E402
from textok.text.embeddings import TextEmbeddings  # noqa: E402
from textok.devices import autocast_for  # noqa: E402
from textok.train.config import TrainConfig, load_train_config  # noqa: E402
from textok.train.loop import LossForward  # noqa: E402
from textok.train.tokenizer import build_components, discriminator_losses, generator_losses, tokenizer_losses  # noqa: E402


def whole_step(cfg: TrainConfig, parts: Any, train_model: torch.nn.Module, perceptual: torch.nn.Module | None,
               images: torch.Tensor, emb: TextEmbeddings | None, device: torch.device) -> Callable[[], None]:
    """One whole tokenizer training step as the trainer takes it: the generator's losses, AdamW + EMA, then the
    discriminator's update when there is one. What this script times and step_parts.py takes apart."""

    def step() -> None:
        with autocast_for(device, cfg.precision):
            recon, terms, _ = generator_losses(train_model, parts.disc, perceptual, images, emb, cfg)
            loss = sum(terms.values())
        loss.backward()
        parts.opt_g.step()
        parts.opt_g.zero_grad(set_to_none=True)
        parts.ema.update(parts.model, 1000)
        if parts.disc is not None:
            with autocast_for(device, cfg.precision):
                d_total = sum(discriminator_losses(parts.disc, parts.lecam, images, recon, cfg).values())
            d_total.backward()
            parts.opt_d.step()
            parts.opt_d.zero_grad(set_to_none=True)

    return step


def bench(preset: str, batch: int, text: bool, text_len: int, steps: int, precision: str, compile_: bool,
          losses: str, device: torch.device, extra_overrides: tuple[str, ...] = ()) -> dict:
    overrides = [f"precision={precision}", "loss.adversarial.start_step=0"]
    if not text:
        overrides += ["model.text_in_encoder=false", "model.text_in_decoder=false"]
    if losses == "l2":
        overrides += ["loss.perceptual=none", "loss.adversarial.weight=0"]
    else:  # the paper's losses at their defaults, also for a small preset (which trains with the l2-only CPU recipe)
        loss = TrainConfig().loss
        overrides += [f"loss.perceptual={loss.perceptual}", f"loss.perceptual_size={loss.perceptual_size}",
                      f"loss.adversarial.weight={loss.adversarial.weight}"]
    cfg = load_train_config(preset, [*overrides, *extra_overrides])  # the caller's overrides win
    model_type, model_cfg = resolve_tokenizer_config(cfg.model, cfg.model_overrides)
    torch.manual_seed(0)
    parts, perceptual = build_components(cfg, model_type, model_cfg, device)
    train_model = LossForward(parts.model, tokenizer_losses)
    if compile_:
        train_model = torch.compile(train_model)
    images = torch.rand(batch, 3, model_cfg.image_size, model_cfg.image_size, device=device) * 2 - 1
    emb = None
    if model_cfg.uses_text:
        emb = TextEmbeddings(torch.randn(batch, text_len, model_cfg.text_dim, device=device),
                             torch.ones(batch, text_len, dtype=torch.bool, device=device), dense=True)

    step = whole_step(cfg, parts, train_model, perceptual, images, emb, device)

    from torch.utils.flop_counter import FlopCounterMode

    step()  # materialise optimizer state before counting
    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    seconds = time_it(step, device, warmup=2 if device.type == "cpu" else 5, iters=steps)
    ips = batch / seconds
    peak = peak_flops(device)
    tokenizer_flops = 3 * parts.model.flops_per_image(text_len if model_cfg.uses_text else 0)
    return {
        "preset": preset, "text": model_cfg.uses_text, "losses": losses, "batch": batch,
        "params_M": round(sum(p.numel() for p in parts.model.parameters()) / 1e6, 1),
        "GFLOP/img (step)": round(flops_per_step / batch / 1e9, 2),
        "GFLOP/img (tokenizer fwd+bwd)": round(tokenizer_flops / 1e9, 2),
        "images/s": round(ips, 1),
        "MFU": f"{flops_per_step / seconds / peak * 100:.1f}%" if peak else "n/a",
        "precision": cfg.precision, "compile": compile_,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["textok-tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--modes", nargs="+", default=["text", "no-text"], choices=["text", "no-text"])
    p.add_argument("--losses", nargs="+", default=["all"], choices=["all", "l2"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step_<device>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = [bench(preset, args.batch, mode == "text", args.text_len, args.steps, args.precision, args.compile, losses,
                  device)
            for preset in args.preset for mode in args.modes for losses in args.losses]
    print(f"device: {device_name(device)}")
    print_table(rows)
    tag = "cuda" if device.type == "cuda" else "cpu"
    write_json(args.out or Path(__file__).parent / "results" / f"train_step_{tag}.json",
               {"device": device_name(device), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
