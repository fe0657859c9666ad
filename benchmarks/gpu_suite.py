"""The GPU suite: everything worth measuring on a lent GPU, in one command that fits one device call.

A lent H100 gives 15 minutes in all (start, transfers and idle included; one command at most 10 minutes).
Four phases run in one command (in the order a, b, d, c), each within its own time budget and a global deadline,
each failing on its own (a broken phase is reported, the next one still runs); docs/GPU.md says what they measure:

a. **correctness** (<= 60 s): the tests marked ``gpu`` (tests/test_gpu.py: bf16 autocast against float32
   for TexTok, TiTok, DiT and MaskGIT; torch.compile against eager; CUDA-graph sampling against the eager
   loop; exact resume of a checkpoint written on the GPU; an NCCL process group of one).
b. **throughput and MFU** (<= 180 s): a bf16 matmul ceiling; TexTok ViT-B/16 encode and decode at 256 px
   with 64 tokens (text and no text); a full TexTok training step with all losses at ``textok-b-256-64``
   (text, no text) and an l2-only one; DiT-XL forward over 32, 64, 256 and 1024 tokens; a DiT-XL training
   step over 32 tokens; each against its target (docs/TARGETS.md). Rows run in priority order until the budget
   is spent; the rest are reported as not run.
   Phase b also runs the fast paths (unmasked attention, FP8 blocks, a larger batch, the compiled
   channels_last training step) and the per-part MFU table of the step (benchmarks/step_parts.py).
d. **speed headlines** (<= 60 s, benchmarks/gpu_headlines.py): samples/s end to end of MaskGIT over TiTok
   codes, DiT over TexTok tokens and VAR over ImageFolder codes beside a FLOP-matched DiT-XL/2.
c. **the Flowers-102 study at 64 px** (the time left, ~250 s; benchmarks/gpu_study.py): two cells, text in
   the decoder vs none at N=8, l2 + perceptual then the GAN once they reconstruct, with the steps planned
   from measured step times; verdicts beside the CPU recipe's seed spread.

It writes at most 8 files to ``--out`` (``$OUT`` on the device machine): ``gpu_suite.json``,
``gpu_suite.md``, ``correctness.log``, ``study_stage{1,2}.md`` and ``study_stage{1,2}_grid.png``; the summary
table is printed last.

What travels (the device tool carries the working tree, at most 64 MiB): the repository (~3.5 MiB) and
``.gpu-pack/`` (~51 MiB), made here first by ``python benchmarks/gpu_pack.py``: Flowers-102 at 64 px
(gzip), a float16 MiniLM with only the vocabulary the captions use, and open_nsfw as float16 safetensors.
The GPU machine has PyTorch, transformers, onnx and the rest of textok's dependencies, but not textok's
wheels or any weights. The command, with ``carry: [".gpu-pack"]`` and a 600 s limit:

    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --pack .gpu-pack --out $OUT

On a CPU, ``--cpu-smoke`` (``make gpu-smoke``) runs every phase at tiny sizes in about two minutes
(tests/test_gpu_suite.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_headlines import phase_headlines, render as render_headlines  # noqa: E402
from gpu_study import phase_study, render as render_study  # noqa: E402

NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 datasheet peaks (SXM)

# Peer numbers on one H100 (docs/TARGETS.md, with sources): images/s of the official code, and our targets.
TARGETS = {
    "textok_encode_text": ("≥ 2× TiTok-B/16 encoder (4,111 img/s)", 2 * 4111),
    "textok_decode_text": ("≥ 2× TiTok-B/16 decoder (4,109 img/s)", 2 * 4109),
    "textok_encode_notext": ("≥ 2× TiTok-B/16 encoder (4,111 img/s)", 2 * 4111),
    "textok_decode_notext": ("≥ 2× TiTok-B/16 decoder (4,109 img/s)", 2 * 4109),
    "textok_step_all_text": ("≥ 1.3× TiTok B-64 l2 step (627 img/s)", 1.3 * 627),
    "textok_step_all_notext": ("≥ 1.3× TiTok B-64 l2 step (627 img/s)", 1.3 * 627),
    "textok_step_l2_notext": ("TiTok B-64 l2 step: 627 img/s", 627),
    "dit_xl_fwd_32": ("≥ 14,000 img/s", 14000),
    "dit_xl_fwd_1024": ("official DiT-XL/2 at 512 px, bf16: 235 img/s", 235),
    "dit_xl_fwd_256": ("official DiT-XL/2 at 256 px, bf16: 1,019 img/s", 1019),
    "dit_xl_step_32": ("≥ 10× official DiT-XL/2 step (313 img/s)", 3130),
}


@dataclass
class Sizes:
    """What each phase runs: the real sizes on a GPU, tiny ones for ``--cpu-smoke``."""

    matmul: int = 8192
    tok_preset: str = "textok-b-256-64"
    tok_batch: int = 256
    tok_big_batch: int = 1024  # the batch that fills the card (the _big rows)
    step_batch: int = 64
    text_len: int = 32
    dit: str = "dit-xl"
    dit_batches: dict[int, int] = field(default_factory=lambda: {32: 1024, 64: 512, 256: 128, 1024: 32})
    dit_step_batch: int = 256
    iters: int = 10
    warmup: int = 3
    study_overrides: tuple[str, ...] = ()
    calib_steps: int = 40  # one short run measures both stages' step time (benchmarks/gpu_study.py)
    step_overrides: tuple[str, ...] = ()  # training config of the tokenizer-step rows (default: all losses at 224)
    step_perceptual_size: int = 224  # of the step-parts table

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(matmul=128, tok_preset="textok-tiny", tok_batch=4, tok_big_batch=8, step_batch=4, text_len=6,
                   dit="dit-tiny", dit_batches={16: 4}, dit_step_batch=4, iters=2, warmup=1, calib_steps=4,
                   step_perceptual_size=32,
                   step_overrides=("loss.perceptual_size=32",),
                   study_overrides=("model.patch_size=16", "model.encoder.heads=2", "model.encoder.width=32",
                                    "model.encoder.depth=1", "model.decoder.heads=2", "model.decoder.width=32",
                                    "model.decoder.depth=1", "batch_size=4", "data.workers=0",
                                    "loss.perceptual_size=32", "log_every=1"))


class Clock:
    """A global deadline and per-phase budgets (seconds from now)."""

    def __init__(self, deadline: float) -> None:
        self.end = time.time() + deadline

    def left(self) -> float:
        return self.end - time.time()

    def budget(self, wanted: float) -> float:
        return max(0.0, min(wanted, self.left()))


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call (CUDA events on a GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def cuda_graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` (static inputs) captured in a CUDA graph after a warm-up on a side stream; ``fn`` itself on a CPU."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    return replay


def compile_blocks(module: torch.nn.Module, device: torch.device) -> None:
    """Regional compilation: compile each transformer block in place (the blocks share one compiled graph)."""
    from textok.models.dit import DiTBlock
    from textok.models.vit import Block

    for m in module.modules():
        if isinstance(m, (Block, DiTBlock)):
            m.compile(backend="inductor" if device.type == "cuda" else "eager")


# ---- phase a -------------------------------------------------------------------------------------------------
def phase_correctness(out: Path, budget: float, smoke: bool) -> dict[str, Any]:
    """The ``gpu`` tests in a subprocess (a hung collective cannot stall the suite), with a JUnit summary."""
    xml = Path(tempfile.mkdtemp()) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "addopts="]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(budget, 5))
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log, rc = ((err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")) + \
            f"\n[timed out after {budget:.0f} s]", "timeout"
    (out / "correctness.log").write_text(log)
    tests = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            tests.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    return {"returncode": rc, "seconds": round(time.time() - t0, 1), "counts": counts, "tests": tests}


# ---- phase b -------------------------------------------------------------------------------------------------
# variants of a row that answer to the same target (fast paths, the mask kept, another batch)
TARGET_OF = {f"textok_{side}_{text}{suffix}": f"textok_{side}_{text}"
             for side in ("encode", "decode") for text in ("text", "notext")
             for suffix in ("_fp8", "_masked", "_big", "_fp8_big")}
TARGET_OF.update({"textok_step_all_text_fast": "textok_step_all_text",
                  "textok_step_all_notext_fast": "textok_step_all_notext",
                  "textok_step_all_text_fast_native": "textok_step_all_text"})

def _row(name: str, images_per_s: float, flops_per_image: float, peak: float | None, ceiling: float | None,
         **extra: Any) -> dict[str, Any]:
    row = {"row": name, "images_per_s": round(images_per_s, 1), "gflop_per_image": round(flops_per_image / 1e9, 3),
           "tflop_per_s": round(images_per_s * flops_per_image / 1e12, 2)}
    if peak:
        row["mfu"] = round(images_per_s * flops_per_image / peak, 4)
    if ceiling:
        row["mfu_of_measured_ceiling"] = round(images_per_s * flops_per_image / ceiling, 4)
    target = TARGET_OF.get(name, name)
    if target in TARGETS and peak:  # targets are for the GPU they were measured on
        what, value = TARGETS[target]
        row["target"] = what
        row["meets_target"] = images_per_s >= value
    row.update(extra)
    return row


def bench_matmul(sizes: Sizes, device: torch.device) -> float:
    n = sizes.matmul
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    s = seconds_per_call(lambda: a @ b, device, sizes.warmup, sizes.iters)
    return 2 * n**3 / s


def bench_tokenizer(sizes: Sizes, device: torch.device, side: str, text: bool, compiled: bool, fp8: bool = False,
                    masked: bool = False, batch: int | None = None) -> tuple[float, float, dict]:
    """images/s and FLOPs/image of TexTok encode or decode, bf16 weights, inference mode (+ compile, graphs).

    The captions are unpadded (``TextEmbeddings.dense``: attention without a mask) unless ``masked`` keeps the
    key-padding mask as a padded batch would (the H200 run's path); ``fp8``: the blocks' matmuls in e4m3."""
    from textok.models.fp8 import fp8_supported, use_fp8_linears
    from textok.models.textok import TexTok, TexTokConfig
    from textok.text.embeddings import TextEmbeddings

    over = [] if text else ["text_in_encoder=false", "text_in_decoder=false"]
    cfg = TexTokConfig.preset(sizes.tok_preset).override(over)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = TexTok(cfg).to(device, dtype).eval()
    B, L = batch or sizes.tok_batch, sizes.text_len
    emb = TextEmbeddings(torch.randn(B, L, cfg.text_dim, device=device, dtype=dtype),
                         torch.ones(B, L, dtype=torch.bool, device=device), not masked) if text else None
    if fp8:
        if device.type == "cuda" and not fp8_supported(device):
            raise RuntimeError(f"{torch.cuda.get_device_name(device)} has no FP8 matmuls (compute capability < 8.9)")
        use_fp8_linears(model)
    images = torch.rand(B, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype) * 2 - 1
    z = torch.randn(B, cfg.num_tokens, cfg.token_channels, device=device, dtype=dtype)
    if compiled:
        compile_blocks(model, device)
    if side == "encode":
        def call() -> Any:
            with torch.inference_mode():
                return model.encoder(images, emb if cfg.text_in_encoder else None)
        enc_len = cfg.num_patches + cfg.num_tokens + (L if text else 0)
        from textok.models.vit import transformer_flops
        flops = transformer_flops(cfg.encoder, enc_len) + 2 * cfg.num_patches * 3 * cfg.patch_size**2 * cfg.encoder.width \
            + (2 * L * cfg.text_dim * cfg.encoder.width if text else 0)
    else:
        def call() -> Any:
            with torch.inference_mode():
                return model.decoder(z, emb if cfg.text_in_decoder else None)
        from textok.models.vit import transformer_flops
        dec_len = cfg.num_patches + cfg.num_tokens + (L if text else 0)
        flops = transformer_flops(cfg.decoder, dec_len) + 2 * cfg.num_patches * cfg.decoder.width * 3 * cfg.patch_size**2 \
            + (2 * L * cfg.text_dim * cfg.decoder.width if text else 0)
    fn = cuda_graphed(call, device) if compiled else call
    s = seconds_per_call(fn, device, sizes.warmup, sizes.iters)
    precision = str(dtype).replace("torch.", "") + (" + fp8 blocks" if fp8 else "")
    return B / s, flops, {"batch": B, "precision": precision, "compile": compiled,
                          "cuda_graph": compiled and device.type == "cuda", "attention_mask": masked}


def bench_tokenizer_step(sizes: Sizes, device: torch.device, text: bool, losses: str, fast: bool = False,
                         native: bool = False) -> tuple[float, float, dict]:
    """A full tokenizer training step as the loop takes it (benchmarks/train_step.py), FLOPs counted over it.
    ``fast``: the tokenizer's loss forward compiled, the discriminator and perceptual net channels_last and
    compiled; ``native``: the perceptual loss at the images' own size instead of 224 px."""
    from train_step import bench

    compiled = fast and device.type == "cuda"  # inductor on a CPU would spend the smoke run compiling C++
    extra = (("loss.channels_last=true", f"loss.compile_nets={str(compiled).lower()}") if fast else ()) + \
        (("loss.perceptual_size=0",) if native else ())
    row = bench(sizes.tok_preset, sizes.step_batch, text, sizes.text_len, sizes.iters, "bf16" if device.type == "cuda"
                else "fp32", compiled, losses, device, sizes.step_overrides + extra)
    flops = row["GFLOP/img (step)"] * 1e9
    return row["images/s"], flops, {"batch": sizes.step_batch, "precision": row["precision"], "compile": compiled,
                                    "channels_last": fast, "perceptual_size": "image" if native else "224",
                                    "params_M": row["params_M"]}


def bench_step_parts(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """MFU per part of the fast full step (benchmarks/step_parts.py)."""
    from step_parts import measure

    compiled = device.type == "cuda"
    return measure(sizes.tok_preset, sizes.step_batch, True, sizes.text_len, sizes.iters, device,
                   sizes.step_perceptual_size, channels_last=True, compile_nets=compiled, compile_model=compiled)


def bench_dit_forward(sizes: Sizes, device: torch.device, tokens: int, batch: int) -> tuple[float, float, dict]:
    from textok.models.dit import DiT, DiTConfig

    cfg = DiTConfig.preset(sizes.dit).override({"num_tokens": tokens})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = DiT(cfg).to(device, dtype).eval()
    compile_blocks(model, device)
    x = torch.randn(batch, tokens, cfg.in_channels, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device)

    def call() -> Any:
        with torch.inference_mode():
            return model(x, t, y)

    s = seconds_per_call(cuda_graphed(call, device), device, sizes.warmup, sizes.iters)
    return batch / s, model.flops_per_forward(1, 0), {"batch": batch, "precision": str(dtype).replace("torch.", ""),
                                                      "compile": True, "cuda_graph": device.type == "cuda"}


def bench_dit_step(sizes: Sizes, device: torch.device, tokens: int) -> tuple[float, float, dict]:
    """DiT training step: flow-matching loss, bf16 autocast, fused AdamW, blocks compiled."""
    from textok.diffusion import create_diffusion
    from textok.models.dit import DiT, DiTConfig

    cfg = DiTConfig.preset(sizes.dit).override({"num_tokens": tokens})
    torch.manual_seed(0)
    model = DiT(cfg).to(device).train()
    compile_blocks(model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    diffusion = create_diffusion("flow")
    B = sizes.dit_step_batch
    x0 = torch.randn(B, tokens, cfg.in_channels, device=device)
    y = torch.randint(0, max(cfg.num_classes, 1), (B,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = diffusion.training_loss(model, x0, {"y": y})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = seconds_per_call(step, device, sizes.warmup, sizes.iters)
    return B / s, 3 * model.flops_per_forward(1, 0), {"batch": B, "precision": "bf16 autocast" if device.type == "cuda"
                                                      else "fp32", "compile": True}


def phase_throughput(sizes: Sizes, device: torch.device, budget: float) -> dict[str, Any]:
    t_end = time.time() + budget
    peak = nominal_peak(device)
    result: dict[str, Any] = {"rows": [], "not_run": [], "errors": {}}
    ceiling = None
    try:
        ceiling = bench_matmul(sizes, device)
        result["matmul_ceiling_tflops"] = round(ceiling / 1e12, 1)
    except Exception as err:  # noqa: BLE001 - a row's failure is reported, the phase goes on
        result["errors"]["matmul"] = f"{type(err).__name__}: {err}"
    n32 = min(sizes.dit_batches)
    plan: list[tuple[str, Callable[[], tuple[float, float, dict]] | None]] = [
        ("dit_xl_fwd_32", lambda: bench_dit_forward(sizes, device, n32, sizes.dit_batches[n32])),
        ("textok_encode_text", lambda: bench_tokenizer(sizes, device, "encode", True, True)),
        ("textok_decode_text", lambda: bench_tokenizer(sizes, device, "decode", True, True)),
        ("textok_encode_text_fp8", lambda: bench_tokenizer(sizes, device, "encode", True, True, fp8=True)),
        ("textok_decode_text_fp8", lambda: bench_tokenizer(sizes, device, "decode", True, True, fp8=True)),
        ("textok_step_all_text_fast", lambda: bench_tokenizer_step(sizes, device, True, "all", fast=True)),
        ("textok_step_l2_notext", lambda: bench_tokenizer_step(sizes, device, False, "l2")),
        ("textok_step_all_text", lambda: bench_tokenizer_step(sizes, device, True, "all")),
        ("step_parts", None),  # MFU per part of the fast step: its own table
        ("textok_encode_text_fp8_big", lambda: bench_tokenizer(sizes, device, "encode", True, True, fp8=True,
                                                               batch=sizes.tok_big_batch)),
        ("textok_decode_text_fp8_big", lambda: bench_tokenizer(sizes, device, "decode", True, True, fp8=True,
                                                               batch=sizes.tok_big_batch)),
        ("textok_encode_text_masked", lambda: bench_tokenizer(sizes, device, "encode", True, True, masked=True)),
        ("textok_decode_text_masked", lambda: bench_tokenizer(sizes, device, "decode", True, True, masked=True)),
        ("dit_xl_step_32", lambda: bench_dit_step(sizes, device, n32)),
        ("textok_step_all_text_fast_native", lambda: bench_tokenizer_step(sizes, device, True, "all", fast=True,
                                                                          native=True)),
        ("textok_encode_notext_fp8", lambda: bench_tokenizer(sizes, device, "encode", False, True, fp8=True)),
        ("textok_decode_notext_fp8", lambda: bench_tokenizer(sizes, device, "decode", False, True, fp8=True)),
        ("textok_encode_notext", lambda: bench_tokenizer(sizes, device, "encode", False, True)),
        ("textok_decode_notext", lambda: bench_tokenizer(sizes, device, "decode", False, True)),
        ("textok_step_all_notext", lambda: bench_tokenizer_step(sizes, device, False, "all")),
        ("textok_encode_text_eager", lambda: bench_tokenizer(sizes, device, "encode", True, False)),
        ("textok_decode_text_eager", lambda: bench_tokenizer(sizes, device, "decode", True, False)),
    ] + [(f"dit_xl_fwd_{n}", (lambda n=n, b=b: bench_dit_forward(sizes, device, n, b)))
         for n, b in sizes.dit_batches.items() if n != n32]
    for name, run in plan:
        if time.time() > t_end:
            result["not_run"].append(name)
            continue
        t0 = time.time()
        try:
            if run is None:
                result["step_parts"] = bench_step_parts(sizes, device)
                continue
            ips, flops, extra = run()
            result["rows"].append(_row(name, ips, flops, peak, ceiling, seconds=round(time.time() - t0, 1), **extra))
        except Exception as err:  # noqa: BLE001
            result["errors"][name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            traceback.print_exc()
        finally:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


# ---- phase c -------------------------------------------------------------------------------------------------
def _pack_paths(pack: Path) -> dict[str, Path]:
    data = next((p for p in sorted(pack.glob("*.tar*")) if p.is_file()), None)
    if data is None:
        raise FileNotFoundError(f"{pack} has no data tar: run benchmarks/gpu_pack.py first")
    return {"data": data, "minilm": pack / "minilm-flowers", "opennsfw": pack / "open_nsfw.safetensors"}


def phase_study_c(sizes: Sizes, pack: Path, out: Path, budget: float, smoke: bool) -> dict[str, Any]:
    """Phase c (benchmarks/gpu_study.py): two cells, ℓ2 + perceptual, then the GAN once they reconstruct."""
    return phase_study(_pack_paths(pack), out, budget, smoke, sizes.study_overrides, sizes.calib_steps)


# ---- report --------------------------------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, ""), c) for c in cols) + " |")
    return lines


def _fmt(v: Any, col: str = "") -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if col.startswith("mfu"):
            return f"{v:.1%}"
        return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def render(summary: dict[str, Any]) -> str:
    lines = [f"# GPU suite on {summary['device']}", "",
             f"torch {summary['torch']}, CUDA {summary['cuda']}, {summary['started']}; "
             f"wall time {summary['seconds']:.0f} s.", ""]
    a = summary["phases"].get("a")
    if a:
        lines += ["## a. correctness", ""]
        if "error" in a:
            lines += [f"failed to run: {a['error']}", ""]
        else:
            lines += [f"{a['counts']['passed']} passed, {a['counts']['failed']} failed, {a['counts']['skipped']} "
                      f"skipped in {a['seconds']} s (tests/test_gpu.py; log in correctness.log).", ""]
            lines += _table(a["tests"], ["test", "outcome", "seconds"]) + [""]
    b = summary["phases"].get("b")
    if b:
        lines += ["## b. throughput and MFU", ""]
        if "error" in b:
            lines += [f"failed to run: {b['error']}", ""]
        else:
            lines += [f"bf16 matmul ceiling measured here: {b.get('matmul_ceiling_tflops', 'n/a')} TFLOP/s. MFU is "
                      "against the nominal dense bf16 peak (989 TFLOP/s for an H100 SXM); FLOPs are 2 × "
                      "multiply-adds of the matmuls (a training step's counted over the whole step).", ""]
            lines += _table(b["rows"], ["row", "batch", "precision", "compile", "images_per_s", "gflop_per_image",
                                        "tflop_per_s", "mfu", "target", "meets_target"]) + [""]
            parts = b.get("step_parts")
            if parts:
                lines += [f"MFU per part of the fast training step ({parts['preset']}, batch {parts['batch']}, perceptual at "
                          f"{parts['perceptual_size']} px; benchmarks/step_parts.py): {parts['images_per_s']} images/s.", ""]
                lines += _table(parts["rows"], ["part", "ms", "GFLOP/img", "TFLOP/s", "MFU"]) + [""]
            if b["not_run"]:
                lines += [f"Not run (budget spent): {', '.join(b['not_run'])}.", ""]
            for k, v in b["errors"].items():
                lines += [f"- error in {k}: {v}"]
            lines += [""]
    d = summary["phases"].get("d")
    if d:
        lines += ["## d. speed headlines: samples/s end to end", ""]
        lines += [f"failed to run: {d['error']}", ""] if "error" in d else render_headlines(d)
    c = summary["phases"].get("c")
    if c:
        lines += ["## c. Flowers-102 study at 64 px", ""]
        if "error" in c:
            lines += [f"failed to run: {c['error']}", ""]
        else:
            lines += render_study(c)
    return "\n".join(lines) + "\n"


def print_summary(summary: dict[str, Any]) -> None:
    print("\n==== GPU suite summary ====")
    print(f"device: {summary['device']}  torch {summary['torch']}  wall {summary['seconds']:.0f} s")
    for key, phase in summary["phases"].items():
        status = "error: " + phase["error"] if "error" in phase else "ok"
        print(f"phase {key}: {status} ({phase.get('seconds', phase.get('phase_seconds', '?'))} s)")
    a = summary["phases"].get("a", {})
    if "counts" in a:
        print(f"  correctness: {a['counts']}")
        for t in a["tests"]:
            if t["outcome"] == "failed":
                print(f"    FAILED {t['test']}")
    b = summary["phases"].get("b", {})
    if b.get("rows"):
        print(f"  matmul ceiling {b.get('matmul_ceiling_tflops')} TFLOP/s")
        print(f"  {'row':34s} {'img/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}  target")
        for r in b["rows"]:
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
            ok = "" if "meets_target" not in r else ("met" if r["meets_target"] else "MISSED")
            print(f"  {r['row']:34s} {r['images_per_s']:10.1f} {r['tflop_per_s']:8.2f} {mfu:>6s}  {ok} {r.get('target', '')}")
        for part in b.get("step_parts", {}).get("rows", []):
            print(f"  step part {part['part']:36s} {part['ms']:9.2f} ms  {part['MFU']}")
        if b.get("not_run"):
            print(f"  not run: {', '.join(b['not_run'])}")
        for k, v in b.get("errors", {}).items():
            print(f"  error {k}: {v}")
    d = summary["phases"].get("d", {})
    for q in d.get("ratios", []):
        print(f"  headline {q['row']} / {q['against']}: {q['ratio']}x (paper: {q['paper'] or '-'})")
    c = summary["phases"].get("c", {})
    for name, st in c.get("stages", {}).items():
        v = st.get("verdict")
        print(f"  study {name}: " + (st.get("skipped", "") if v is None else
              f"{st['steps']} steps, PSNR gain {v['PSNR_gain_dB']:+.3f} dB ({v['PSNR']}), FD gain "
              f"{v['FD_gain_relative']:+.1%} ({v['FD']}), swap cost {v['cells']['decoder']['swap_cost_PSNR_dB']:.3f} dB, "
              f"decided: {v['decided']}"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs" / "gpu-suite")))
    p.add_argument("--pack", type=Path, default=ROOT / ".gpu-pack", help="made by benchmarks/gpu_pack.py")
    p.add_argument("--phases", default="abdc", help="which phases to run, in this order (subset of 'abdc')")
    p.add_argument("--budgets", default=None, help="seconds for phases a,b,c,d (default 60,180,540,60: c takes what is "
                   "left before the deadline; generous with "
                   "--cpu-smoke, whose rows must all run however loaded the CPU is)")
    p.add_argument("--deadline", type=float, default=None,
                   help="the whole suite stops starting work after this (default 540 s; 1800 with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="every phase at tiny sizes on the CPU (for the tests)")
    args = p.parse_args(argv)

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not smoke:
        print("no CUDA device: use --cpu-smoke for the CPU mode")
        raise SystemExit(2)
    sizes = Sizes.smoke() if smoke else Sizes()
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    default_budgets = "600,600,600,600" if smoke else "60,180,540,60"
    budgets = dict(zip("abcd", (float(v) for v in (args.budgets or default_budgets).split(","))))
    clock = Clock(args.deadline if args.deadline is not None else (1800 if smoke else 540))
    t_start = time.time()
    summary: dict[str, Any] = {
        "device": gpu_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu_smoke": smoke, "budgets_s": budgets, "phases": {},
    }
    if smoke:
        pack = args.out / "pack"
        from gpu_pack import build
        from make_tiny_data import write_tiny_captioned_tar

        build(write_tiny_captioned_tar(args.out / "pack-src" / "tiny-64.tar"), pack, check_sample=8, smoke=True)
        shutil.rmtree(args.out / "pack-src")
    else:
        pack = args.pack
    if (pack / "open_nsfw.safetensors").is_file():  # the perceptual loss and FD features of phases b and c
        os.environ["TEXTOK_OPENNSFW_WEIGHTS"] = str((pack / "open_nsfw.safetensors").resolve())
    for key in "abdc":  # phase c plans its steps from the time left, so it runs last
        if key not in args.phases:
            continue
        budget = clock.budget(budgets[key])
        if budget <= 1:
            summary["phases"][key] = {"error": "not run: the suite's deadline was reached"}
            continue
        print(f"\n==== phase {key} (budget {budget:.0f} s) ====", flush=True)
        t0 = time.time()
        try:
            if key == "a":
                res = phase_correctness(args.out, budget, smoke)
            elif key == "b":
                res = phase_throughput(sizes, device, budget)
            elif key == "d":
                res = phase_headlines(device, budget, smoke)
            else:
                res = phase_study_c(sizes, pack, args.out, budget, smoke)
        except Exception as err:  # noqa: BLE001 - reported; the next phase still runs
            traceback.print_exc()
            res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        res["phase_seconds"] = round(time.time() - t0, 1)
        summary["phases"][key] = res
        # keep what was measured even if a later phase kills the process
        (args.out / "gpu_suite.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary["seconds"] = time.time() - t_start
    if smoke:
        shutil.rmtree(pack, ignore_errors=True)
    (args.out / "gpu_suite.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (args.out / "gpu_suite.md").write_text(render(summary))
    print_summary(summary)
    return summary


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
