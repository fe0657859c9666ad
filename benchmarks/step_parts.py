"""MFU per part of a full tokenizer training step: where the time of ℓ2 + perceptual + GAN goes.

The step of ``benchmarks/train_step.py`` taken apart, each part timed on its own and its FLOPs counted with
``torch.utils.flop_counter`` (2 × multiply-adds): the tokenizer's forward + backward (ℓ2), the perceptual
network's forward + backward to the reconstruction, the discriminator's generator pass (forward + backward to
the reconstruction, its weights frozen), the discriminator's own update (real and fake forward + backward,
LeCAM, AdamW), the tokenizer's AdamW + EMA, and the whole step as the loop takes it. Options switch on the fast
paths of the loss networks (``loss.channels_last``, ``loss.compile_nets``), the perceptual loss at the images'
own size (``--perceptual-size 0``) and a compiled tokenizer (``--compile``).

    python benchmarks/step_parts.py --preset textok-b-256-64 --batch 64 --no-text             # on a GPU
    python benchmarks/step_parts.py --preset textok-tiny --batch 4 --perceptual-size 32 --iters 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, peak_flops, print_table, time_it, write_json  # noqa: E402
from train_step import whole_step  # noqa: E402

from textok.devices import autocast_for  # noqa: E402
from textok.losses.adversarial import g_loss  # noqa: E402
from textok.models.registry import resolve_tokenizer_config  # noqa: E402
from textok.text.embeddings import TextEmbeddings  # noqa: E402
from textok.train.config import TrainConfig, load_train_config  # noqa: E402
from textok.train.loop import LossForward  # noqa: E402
from textok.train.tokenizer import build_components, discriminator_losses, frozen, tokenizer_losses  # noqa: E402


def flops_of(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measure(preset: str, batch: int, text: bool, text_len: int, iters: int, device: torch.device,
            perceptual_size: int = 224, channels_last: bool = False, compile_nets: bool = False,
            compile_model: bool = False, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Rows (part, ms, GFLOP/img, TFLOP/s, MFU) of one configuration of the step, and the step's totals."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    loss = TrainConfig().loss  # the paper's losses at their defaults
    over = [f"precision={precision}", "loss.adversarial.start_step=0", f"loss.perceptual={loss.perceptual}",
            f"loss.perceptual_size={perceptual_size}", f"loss.adversarial.weight={loss.adversarial.weight}",
            f"loss.channels_last={str(channels_last).lower()}", f"loss.compile_nets={str(compile_nets).lower()}",
            *extra]
    if not text:
        over += ["model.text_in_encoder=false", "model.text_in_decoder=false"]
    cfg = load_train_config(preset, over)
    model_type, model_cfg = resolve_tokenizer_config(cfg.model, cfg.model_overrides)
    torch.manual_seed(0)
    parts, perceptual = build_components(cfg, model_type, model_cfg, device)
    train_model: torch.nn.Module = LossForward(parts.model, tokenizer_losses)
    if compile_model:
        train_model = torch.compile(train_model)
    S = model_cfg.image_size
    images = torch.rand(batch, 3, S, S, device=device) * 2 - 1
    emb = (TextEmbeddings(torch.randn(batch, text_len, model_cfg.text_dim), torch.ones(batch, text_len)).to(device)
           if model_cfg.uses_text else None)
    amp = lambda: autocast_for(device, cfg.precision)  # noqa: E731
    with torch.no_grad(), amp():
        recon_fixed = parts.model(images, emb)[0].float()

    def tokenizer() -> None:
        with amp():
            recon, _ = train_model(images, emb)
            out = F.mse_loss(recon.float(), images)
        out.backward()
        parts.model.zero_grad(set_to_none=True)

    def perceptual_part() -> None:
        x = recon_fixed.detach().requires_grad_(True)
        with amp():
            out = perceptual(x, images).mean()
        out.backward()

    def gan_generator() -> None:
        x = recon_fixed.detach().requires_grad_(True)
        with amp(), frozen(parts.disc):
            out = g_loss(parts.disc(x), cfg.loss.adversarial.kind)
        out.backward()

    def disc_update() -> None:
        with amp():
            total = sum(discriminator_losses(parts.disc, parts.lecam, images, recon_fixed, cfg).values())
        total.backward()
        parts.opt_d.step()
        parts.opt_d.zero_grad(set_to_none=True)

    for p in parts.model.parameters():
        p.grad = torch.zeros_like(p)

    def optimizer() -> None:
        parts.opt_g.step()
        parts.ema.update(parts.model, 1000)

    whole = whole_step(cfg, parts, train_model, perceptual, images, emb, device)

    plan = [("tokenizer fwd+bwd (l2)", tokenizer), ("perceptual fwd+bwd", perceptual_part),
            ("discriminator, generator pass", gan_generator), ("discriminator update (+LeCAM, AdamW)", disc_update),
            ("tokenizer AdamW + EMA", optimizer), ("whole step", whole)]
    peak = peak_flops(device)
    rows = []
    warmup = 2 if device.type == "cpu" else 5
    for name, fn in plan:
        fn()  # materialise optimizer state (and compile) before counting
        flops = flops_of(fn)
        seconds = time_it(fn, device, warmup=warmup, iters=iters)
        rows.append({"part": name, "ms": round(seconds * 1e3, 3), "GFLOP/img": round(flops / batch / 1e9, 3),
                     "TFLOP/s": round(flops / seconds / 1e12, 3),
                     "MFU": f"{flops / seconds / peak:.1%}" if peak else "n/a"})
    whole_row = rows[-1]
    parts_ms = sum(r["ms"] for r in rows[:-1])
    return {"preset": preset, "batch": batch, "text": model_cfg.uses_text, "precision": precision,
            "perceptual_size": perceptual_size or S, "channels_last": channels_last, "compile_nets": compile_nets,
            "compile_model": compile_model, "images_per_s": round(batch / whole_row["ms"] * 1e3, 1),
            "sum_of_parts_ms": round(parts_ms, 3), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="textok-b-256-64")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-text", action="store_true")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--perceptual-size", type=int, default=224, help="0: the images' own size")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile-nets", action="store_true", help="compile the discriminator and perceptual net")
    p.add_argument("--compile", action="store_true", help="compile the tokenizer's loss forward")
    p.add_argument("--override", action="append", default=[], help="more training overrides key=value")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step_parts_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = measure(args.preset, args.batch, not args.no_text, args.text_len, args.iters, device,
                     args.perceptual_size, args.channels_last, args.compile_nets, args.compile, tuple(args.override))
    print(f"device: {device_name(device)}; {args.preset}, batch {args.batch}, {result['images_per_s']} images/s "
          f"for the whole step (parts alone: {result['sum_of_parts_ms']} ms)")
    print_table(result["rows"])
    tag = "cuda" if device.type == "cuda" else "cpu"
    write_json(args.out or Path(__file__).parent / "results" / f"step_parts_{tag}.json",
               {"device": device_name(device), "torch": torch.__version__, **result})
    return result


if __name__ == "__main__":
    main()
