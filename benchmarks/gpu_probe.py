"""Where does the 64-px study's training step spend its time on a GPU? A short probe for a lent GPU.

The GPU suite's Flowers-102 study ran at 108 ms per step (batch 128) and 245 ms (batch 512) on an H200 for a
model whose matmuls need a few ms (benchmarks/results/gpu-suite-h200.md). This measures, in under two minutes:

* the cost of one kernel launch (10,000 tiny in-place adds, host-timed) and of one CUDA-graph replay of them;
* the study recipe's step taken apart at batch 512: the ViT tokenizer forward + backward (l2), + the open_nsfw
  perceptual loss, + the discriminator's generator pass and its own update, + AdamW and EMA;
* the same tokenizer forward + backward replayed from a CUDA graph (its floor without launch overhead).

    PYTHONPATH=src python3 benchmarks/gpu_probe.py --pack .gpu-pack --out $OUT          # on the GPU
    python benchmarks/gpu_probe.py --cpu-smoke --out /tmp/probe                          # tiny, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import time_it  # noqa: E402
from gpu_suite import cuda_graphed  # noqa: E402
from textok.losses.adversarial import d_loss, g_loss  # noqa: E402
from textok.models.registry import resolve_tokenizer_config  # noqa: E402
from textok.text.embeddings import TextEmbeddings  # noqa: E402
from textok.train.config import load_train_config  # noqa: E402
from textok.train.tokenizer import build_components  # noqa: E402


def launch_cost(device: torch.device, n: int) -> dict[str, float]:
    x = torch.zeros(16, device=device)

    def many() -> None:
        for _ in range(n):
            x.add_(1.0)

    eager = time_it(many, device, warmup=1, iters=3)
    out = {"launches": n, "eager_us_per_launch": eager / n * 1e6}
    if device.type == "cuda":
        out["graph_us_per_launch"] = time_it(cuda_graphed(many, device), device, warmup=1, iters=3) / n * 1e6
    return out


def step_parts(device: torch.device, batch: int, smoke: bool) -> dict[str, float]:
    """The study recipe's step, one more part at a time (ms per step)."""
    over = ["loss.adversarial.start_step=0"]
    if smoke:
        over += ["model.encoder.heads=2", "model.decoder.heads=2", "model.encoder.width=32", "model.decoder.width=32",
                 "model.encoder.depth=1", "model.decoder.depth=1", "model.patch_size=16"]
    cfg = load_train_config("study-flowers-gpu", over)
    model_type, model_cfg = resolve_tokenizer_config(cfg.model, cfg.model_overrides)
    torch.manual_seed(0)
    parts, perceptual = build_components(cfg, model_type, model_cfg, device)
    model, disc = parts.model.train(), parts.disc
    S = model_cfg.image_size
    images = torch.rand(batch, 3, S, S, device=device) * 2 - 1
    L = 24
    text = TextEmbeddings(torch.randn(batch, L, model_cfg.text_dim, device=device),
                          torch.arange(L, device=device)[None] < torch.randint(8, L + 1, (batch, 1), device=device))
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def l2() -> None:
        with bf16:
            recon, _ = model(images, text)
            loss = F.mse_loss(recon.float(), images)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def l2_perc() -> None:
        with bf16:
            recon, _ = model(images, text)
            loss = F.mse_loss(recon.float(), images) + 0.1 * perceptual(recon.float(), images).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def full() -> None:
        with bf16:
            recon, _ = model(images, text)
            loss = F.mse_loss(recon.float(), images) + 0.1 * perceptual(recon.float(), images).mean()
            disc.requires_grad_(False)
            loss = loss + 0.1 * g_loss(disc(recon))
            disc.requires_grad_(True)
        loss.backward()
        parts.opt_g.step()
        parts.opt_g.zero_grad(set_to_none=True)
        parts.ema.update(model, 1000)
        with bf16:
            d = d_loss(disc(images), disc(recon.detach()))
        d.backward()
        parts.opt_d.step()
        parts.opt_d.zero_grad(set_to_none=True)

    ms = {"l2_fwd_bwd_ms": l2, "plus_perceptual_ms": l2_perc, "full_step_ms": full}
    out = {"batch": batch, **{k: time_it(fn, device, 3, 10) * 1e3 for k, fn in ms.items()}}
    if device.type == "cuda":  # the same l2 forward + backward without launch overhead
        static_text = TextEmbeddings(text.states, torch.ones_like(text.mask))  # a fixed mask: a static graph

        def graphed_body() -> None:
            with bf16:
                recon, _ = model(images, static_text)
                loss = F.mse_loss(recon.float(), images)
            loss.backward()

        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        out["l2_fwd_bwd_cuda_graph_ms"] = time_it(cuda_graphed(graphed_body, device), device, 3, 10) * 1e3
        out["l2_fwd_bwd_eager_fixed_mask_ms"] = time_it(graphed_body, device, 3, 10) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-probe")))
    p.add_argument("--pack", type=Path, default=ROOT / ".gpu-pack")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if (args.pack / "open_nsfw.safetensors").is_file():
        os.environ["TEXTOK_OPENNSFW_WEIGHTS"] = str((args.pack / "open_nsfw.safetensors").resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__}
    result["launch"] = launch_cost(device, 200 if args.cpu_smoke else 10_000)
    print(json.dumps(result["launch"]), flush=True)
    for batch in ((4,) if args.cpu_smoke else (128, 512)):
        result[f"step_b{batch}"] = step_parts(device, batch, args.cpu_smoke)
        print(json.dumps(result[f"step_b{batch}"]), flush=True)
    (args.out / "gpu_probe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
