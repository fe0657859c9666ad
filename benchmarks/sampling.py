"""DiT sampling throughput: images/s and MFU of DiT-{B, L, XL} forward passes over 1D token sequences.

Generating one image costs ``steps`` forward passes (twice the batch with classifier-free guidance), so the
sampling rate is reported as forward throughput / (steps × (2 if CFG else 1)); the fixed cost of the
sampler's element-wise update per step is small beside a forward pass and not included (``--measure-loop``
times a real DDIM loop to check).

On a GPU it times every model × token count × batch in the sweep (bf16 autocast or bf16 weights,
optionally ``torch.compile`` and CUDA graphs). On a CPU it prints the FLOP table (GFLOPs per image per
forward, parameters) of the big models without timing them and times only a tiny DiT. MFU is reported
against the H100's nominal dense bf16 peak (989 TFLOP/s) and against the 779 TFLOP/s bf16 matmul ceiling
measured on one (docs/TARGETS.md). FLOPs are 2 × multiply-adds (the DiT paper's "Gflops" are multiply-adds).

    python benchmarks/sampling.py                       # CPU: FLOP table + tiny timing, < 60 s
    python benchmarks/sampling.py --compile --cuda-graphs --batch 64,256,1024   # on an H100
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textok.diffusion import create_diffusion  # noqa: E402
from textok.models.dit import H100_BF16_MEASURED_FLOPS, H100_BF16_PEAK_FLOPS, DiT, DiTConfig  # noqa: E402

TOKENS_DEFAULT = "32,64,128,256,1024"  # 1024 = the 512-px DiT-XL/2 shape


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"(h100|h200|a100|l40s?|l4|a10g?|v100|t4|rtx ?\d+|b200|gh200)", name)
    return re.sub(r"[^a-z0-9]+", "-", m.group(1) if m else name).strip("-")


def build(name: str, tokens: int, args: argparse.Namespace, device: torch.device) -> DiT:
    cfg = DiTConfig.preset(name).override({"num_tokens": tokens, "text_dim": args.text_dim})
    with torch.device(device):
        model = DiT(cfg)
    model.eval().requires_grad_(False)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    return model


def flop_table(models: list[str], tokens: list[int], text_len: int, text_dim: int) -> list[dict[str, Any]]:
    """GFLOPs per image per forward and parameters, from configs built on the meta device (no memory)."""
    rows = []
    for name in models:
        for n in tokens:
            cfg = DiTConfig.preset(name).override({"num_tokens": n, "text_dim": text_dim})
            with torch.device("meta"):
                model = DiT(cfg)
            rows.append(
                {
                    "model": name,
                    "tokens": n,
                    "params_m": model.num_params() / 1e6,
                    "gflops_per_forward": model.flops_per_forward(1, text_len) / 1e9,
                }
            )
    return rows


def make_forward(model: DiT, batch: int, args: argparse.Namespace, device: torch.device) -> Callable[[], torch.Tensor]:
    """A no-argument callable running one forward pass on static inputs (CUDA-graph friendly)."""
    cfg = model.config
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    x = torch.randn(batch, cfg.num_tokens, cfg.in_channels, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device) if cfg.num_classes else None
    text = mask = None
    if cfg.text_dim:
        text = torch.randn(batch, args.text_len, cfg.text_dim, device=device, dtype=dtype)
        mask = torch.ones(batch, args.text_len, dtype=torch.bool, device=device)
    fn = torch.compile(model, mode=args.compile_mode) if args.compile else model
    autocast = args.precision == "autocast" and device.type == "cuda"

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return fn(x, t, y, text, mask)

    if not (args.cuda_graphs and device.type == "cuda"):
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (and compile) outside the graph
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    return replay


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call over ``iters`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(name: str, tokens: int, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = build(name, tokens, args, device)
    row: dict[str, Any] = {"model": name, "tokens": tokens, "batch": batch}
    flops = model.flops_per_forward(batch, args.text_len)
    try:
        fn = make_forward(model, batch, args, device)
        sec = time_fn(fn, device, args.warmup, args.iters)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        del model
        torch.cuda.empty_cache()
        return row
    ips = batch / sec
    per_image_calls = args.steps * (2 if args.cfg else 1)
    row.update(
        ms_per_forward=sec * 1e3,
        images_per_s=ips,
        tflops=flops / sec / 1e12,
        mfu_nominal=flops / sec / H100_BF16_PEAK_FLOPS,
        mfu_measured_ceiling=flops / sec / H100_BF16_MEASURED_FLOPS,
        sampling_images_per_s=ips / per_image_calls,
        sampling_s_per_image=per_image_calls / ips,
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_loop(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time a real DDIM loop of the tiny DiT against steps × forward, to show the sampler's overhead."""
    cfg = DiTConfig.preset("dit-tiny")
    model = DiT(cfg).to(device).eval()
    diffusion = create_diffusion("dit")
    B, steps = 8, 10
    y = torch.zeros(B, dtype=torch.long, device=device)
    shape = (B, cfg.num_tokens, cfg.in_channels)

    def loop() -> torch.Tensor:
        return diffusion.sample(model, shape, steps=steps, sampler="ddim", cfg_scale=4.0, model_kwargs={"y": y}, device=device)

    x = torch.randn(2 * B, cfg.num_tokens, cfg.in_channels, device=device)
    t = torch.zeros(2 * B, dtype=torch.long, device=device)
    yy = torch.cat([y, y])

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, yy)

    loop_s = time_fn(loop, device, 1, 3)
    fwd_s = time_fn(fwd, device, 2, 10)
    return {"model": "dit-tiny", "batch": B, "steps": steps, "cfg": True, "loop_s": loop_s, "steps_x_forward_s": steps * fwd_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="dit-b,dit-l,dit-xl")
    p.add_argument("--tokens", default=TOKENS_DEFAULT, help="token counts N (comma separated)")
    p.add_argument("--batch", default="256", help="batch sweep (comma separated); CPU tiny timing uses --cpu-batch")
    p.add_argument("--precision", choices=["autocast", "bf16", "fp32"], default="autocast",
                   help="bf16 autocast with fp32 weights, bf16 weights, or fp32 (TF32 off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the forward pass in a CUDA graph")
    p.add_argument("--steps", type=int, default=250, help="sampling steps for the sampling estimate (DiT: 250)")
    p.add_argument("--no-cfg", dest="cfg", action="store_false", help="sampling estimate without CFG")
    p.add_argument("--text-dim", type=int, default=0, help="benchmark text-conditioned DiTs with this text width")
    p.add_argument("--text-len", type=int, default=32, help="text tokens per caption (text models only)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cpu-batch", type=int, default=16)
    p.add_argument("--measure-loop", action="store_true", help="also time a real sampling loop (tiny DiT)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sampling_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tokens = _ints(args.tokens)
    t0 = time.time()

    table = flop_table(models, tokens, args.text_len, args.text_dim)
    print(f"FLOPs per image per forward (2 x multiply-adds), text_dim={args.text_dim}")
    print(f"{'model':8s} {'N':>5s} {'params(M)':>10s} {'GFLOPs':>9s}")
    for r in table:
        print(f"{r['model']:8s} {r['tokens']:5d} {r['params_m']:10.1f} {r['gflops_per_forward']:9.2f}")

    rows: list[dict[str, Any]] = []
    if device.type == "cuda":
        sweep = [(m, n, b) for m in models for n in tokens for b in _ints(args.batch)]
    else:
        # A CPU cannot time the big models in reasonable time: time the tiny DiT only.
        args.precision = "fp32" if args.precision == "autocast" else args.precision
        sweep = [("dit-tiny", 16, args.cpu_batch)]
        args.iters, args.warmup = min(args.iters, 10), min(args.warmup, 2)
    print(f"\ntiming on {device_tag(device)} ({args.precision}{', compile' if args.compile else ''}"
          f"{', cuda graphs' if args.cuda_graphs and device.type == 'cuda' else ''}); sampling = {args.steps} steps"
          f"{' x 2 (CFG)' if args.cfg else ''} x forward")
    head = f"{'model':8s} {'N':>5s} {'batch':>6s} {'ms/fwd':>9s} {'img/s fwd':>11s} {'TFLOP/s':>8s} {'MFU989':>7s} {'MFU779':>7s} {'img/s sample':>13s}"
    print(head)
    for name, n, b in sweep:
        r = bench_one(name, n, b, args, device)
        rows.append(r)
        if "error" in r:
            print(f"{name:8s} {n:5d} {b:6d} {r['error']}")
            continue
        print(f"{name:8s} {n:5d} {b:6d} {r['ms_per_forward']:9.2f} {r['images_per_s']:11.1f} {r['tflops']:8.2f} "
              f"{r['mfu_nominal']:7.1%} {r['mfu_measured_ceiling']:7.1%} {r['sampling_images_per_s']:13.2f}")
    if device.type != "cuda":
        print("(MFU columns are against H100 peaks and meaningless on a CPU; shown for the format only)")

    loop = measure_loop(args, device) if (args.measure_loop or device.type != "cuda") else None
    if loop:
        print(f"\nreal DDIM loop, dit-tiny, batch {loop['batch']}, {loop['steps']} steps with CFG: "
              f"{loop['loop_s'] * 1e3:.1f} ms vs steps x forward {loop['steps_x_forward_s'] * 1e3:.1f} ms")

    result = {
        "benchmark": "dit_sampling",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "compile": args.compile,
        "cuda_graphs": bool(args.cuda_graphs and device.type == "cuda"),
        "steps": args.steps,
        "cfg": args.cfg,
        "text_dim": args.text_dim,
        "text_len": args.text_len,
        "peak_flops_nominal": H100_BF16_PEAK_FLOPS,
        "peak_flops_measured_ceiling": H100_BF16_MEASURED_FLOPS,
        "flop_table": table,
        "timings": rows,
        "sampling_loop_check": loop,
        "wall_s": time.time() - t0,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"sampling_{device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({result['wall_s']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
