"""ImageFolder's ablation at CPU scale: single codebook vs product quantization (folded and not), semantic
regularization none / one branch / all branches, quantizer dropout on / off.

Every cell trains the demo's tokenizer (configs/demo-imagefolder.yaml, 32 px, scales 1,2,3,4) for --tok-steps on
the embedded scenes, evaluates it on the 200 held-out scenes (PSNR / SSIM / FD-opennsfw@64, code usage), extracts
the codes, trains the demo's VAR for --gen-steps and measures its teacher-forced held-out token loss. The semantic
teacher is open_nsfw's pooled feature (a supervised NSFW classifier: the one pretrained image network offline,
far less semantic than the paper's DINOv2). Cells that share a tokenizer (folded vs unfolded VAR) train it once.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/imagefolder_ablation.py [--tok-steps 600] [--gen-steps 400]

Prints a table and writes benchmarks/results/imagefolder-ablation-cpu.{json,md}; runs go to runs/if-ablation/
(resumable: a finished cell is not trained again).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from textok.apps.demos.imagefolder import heldout_var_loss, usage_per_scale
from textok.apps.demos.titok import _codes
from textok.data.factory import build_dataset
from textok.eval.reconstruction import evaluate_tokenizer
from textok.io import atomic_write_text
from textok.models.registry import load_tokenizer
from textok.report import markdown_table, print_table
from textok.train.config import load_generator_config, load_train_config
from textok.train.generator import train_generator
from textok.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "demo-imagefolder"
# cell -> (tokenizer name, its overrides, VAR overrides); the paper's order: one codebook -> PQ with folding ->
# + semantic regularization on all branches -> on one branch; quantizer dropout is on unless said otherwise.
CELLS = {
    "single codebook (P=1)": ("p1", {"model.quantizer.branches": 1}, {}),
    "PQ (P=2), folded VAR": ("p2", {}, {}),
    "PQ (P=2), unfolded VAR (fold=False)": ("p2", {}, {"model.fold": False}),
    "PQ + semantic reg. one branch (opennsfw)": ("p2-sem1", {"model.semantic_teacher": "opennsfw",
                                                            "model.teacher_size": 64}, {}),
    "PQ + semantic reg. all branches (opennsfw)": ("p2-semall", {"model.semantic_teacher": "opennsfw",
                                                                "model.teacher_size": 64,
                                                                "model.semantic_branches": "all"}, {}),
    "PQ, quantizer dropout off": ("p2-nodrop", {"model.quantizer.dropout": 0.0}, {}),
}
GENERATOR = {"batch_size": 64, "optim.lr": 1e-3, "ema_decay": 0.99, "log_every": 50, "ckpt_every": 10_000}


def run_cell(name: str, out: Path, tok_steps: int, gen_steps: int, train_scenes: int) -> dict:
    tok_name, tok_over, gen_over = CELLS[name]
    t0 = time.time()
    cfg = load_train_config(RECIPE, {"max_steps": tok_steps, "ckpt_every": tok_steps, "optim.warmup_steps": 50,
                                     **tok_over})
    tok_dir = train_tokenizer(cfg, out / tok_name / "tokenizer", progress=False)
    tok = load_tokenizer(tok_dir).eval()
    d = cfg.data
    val = build_dataset(d.source, d.val_split, tok.config.image_size, size=d.val_size, seed=d.seed)
    recon = evaluate_tokenizer(tok, val, num=len(val), batch_size=64, fd_size=cfg.loss.perceptual_size,
                               progress=False)
    lat = _codes(tok_dir, out / tok_name / "latents", "train", train_scenes, d.seed, True)
    val_lat = _codes(tok_dir, out / tok_name / "val-latents", d.val_split, d.val_size, d.seed, True)
    usage = usage_per_scale(val_lat)
    run_name = "var" + "".join(f"-{k.split('.')[-1]}{v}" for k, v in gen_over.items())
    gcfg = load_generator_config("var-s-32", {"latents": str(lat), **GENERATOR, "max_steps": gen_steps,
                                              "batch_size": min(GENERATOR["batch_size"], train_scenes),
                                              "optim.warmup_steps": min(100, gen_steps // 4), **gen_over})
    gen_dir = train_generator(gcfg, out / tok_name / run_name, progress=False)
    held = heldout_var_loss(gen_dir, val_lat)
    q = tok.config.quantizer
    return {"cell": name, "PSNR": recon["PSNR"], "SSIM": recon["SSIM"],
            "FD-opennsfw@64": recon.get("FD-opennsfw@64", float("nan")),
            "code usage (mean over branches)": sum(usage["all_scales"]) / len(usage["all_scales"]),
            "VAR held-out loss per code id": held["loss"],
            "VAR held-out nats per image": held["loss"] * q.branches * q.codes_per_branch,
            "class gain (nats per id)": held["class_gain_nats"], "positions": gcfg_positions(gen_dir),
            "code ids": q.branches * q.codes_per_branch, "seconds": round(time.time() - t0, 1),
            "usage_per_scale": usage, "heldout": held}


def gcfg_positions(gen_dir: Path) -> int:
    config = json.loads((gen_dir / "config.json").read_text())["config"]
    per_branch = sum(s * s for s in config["scales"])
    return per_branch * (1 if config["fold"] else config["branches"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tok-steps", type=int, default=600)
    p.add_argument("--gen-steps", type=int, default=400)
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--cells", nargs="*", default=list(CELLS), help="which cells (default: all)")
    p.add_argument("--out", default=str(ROOT / "runs" / "if-ablation"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "imagefolder-ablation-cpu"))
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    rows = []
    for name in args.cells:
        print(f"== {name} ==", flush=True)
        rows.append(run_cell(name, out, args.tok_steps, args.gen_steps, args.train_scenes))
        print(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, dict)}), flush=True)
    shown = ["cell", "PSNR", "SSIM", "FD-opennsfw@64", "code usage (mean over branches)",
             "VAR held-out loss per code id", "VAR held-out nats per image", "class gain (nats per id)", "positions",
             "code ids", "seconds"]
    table = [{k: (f"{r[k]:.4f}" if isinstance(r[k], float) and math.isfinite(r[k]) else r[k]) for k in shown}
             for r in rows]
    print_table(table)
    payload = {"tok_steps": args.tok_steps, "gen_steps": args.gen_steps, "train_scenes": args.train_scenes,
               "threads": torch.get_num_threads(), "recipe": RECIPE, "cells": rows}
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results.with_suffix(".json"), json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(results.with_suffix(".md"), "\n".join([
        "# ImageFolder ablation at CPU scale", "",
        f"Tokenizer: configs/{RECIPE}.yaml trained {args.tok_steps} steps x 32 images per cell; VAR (var-s-32 size) "
        f"{args.gen_steps} steps x 64 on the codes of {args.train_scenes} training scenes; metrics on the 200 "
        f"held-out scenes; {torch.get_num_threads()} thread(s). Semantic teacher: open_nsfw's pooled feature "
        "(not DINOv2). Loss per code id is not comparable between P=1 and P=2 (twice the ids); nats per image is.",
        "", markdown_table(table), ""]))
    print(f"wrote {results.with_suffix('.json')} and {results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
