"""Data at scale: does memory stay flat from 10k to 100k images, and does the shard loader outrun a GPU step?

Builds synthetic shard sets (small JPEGs, one unique caption each, random labels) of each ``--sizes``, fills a
text-state store with their captions (``textok encode-captions``, MiniLM), then measures in a fresh process per
case (so peak RSS is that case's alone):

* the loader: one full epoch of :class:`textok.data.shards.ShardStream` (in-process and with DataLoader
  workers): images/s and peak RSS of the main process and of the workers;
* a tiny training run (``textok-demo``, text in encoder and decoder, states read from the store): images/s and
  peak RSS;
* the decode rate at 256 px (a small extra set), which says how many loader workers one GPU needs.

Targets (benchmarks/results/gpu-suite-h200.md): a TexTok ViT-B/16 l2 training step consumes 764 images/s and a
full step ~230 images/s on an H200, so the loader must deliver >= 764 images/s per GPU; RSS growth from 10k to
100k must stay <= 10%. Prints a table and writes JSON to benchmarks/results/. The shard sets are written under
``--workdir`` and removed at the end (``--keep`` keeps them).

    python benchmarks/data_scale.py                      # 10k and 100k, 32 px
    python benchmarks/data_scale.py --sizes 2000 --steps 20 --out /tmp/x.json   # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("red blue green yellow small large round square bird dog cat flower tree car house boat sky field river "
         "mountain street sitting standing flying under over near beside a the with on in of and").split()
GPU_L2_STEP, GPU_FULL_STEP = 764, 230  # images/s of a TexTok ViT-B/16 training step on an H200 (gpu-suite-h200.md)


def build_set(out: Path, n: int, px: int, shard_size: int, seed: int = 0) -> float:
    """A shard directory of ``n`` synthetic JPEGs; returns its size in MB."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "src"))
    from textok.data.make_shards import write_shards
    from textok.data.shards import FORMAT, INDEX

    rng = np.random.default_rng(seed)
    words = random.Random(seed)

    def samples():
        for i in range(n):
            base = rng.integers(0, 256, 3)
            grad = np.linspace(0, 1, px)[None, :, None] * rng.integers(-120, 120, 3)
            arr = np.clip(base + grad + rng.normal(0, 12, (px, px, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            caption = f"image {i}: " + " ".join(words.choice(WORDS) for _ in range(8))
            yield {"image": buf.getvalue(), "ext": "jpg", "captions": [caption], "label": int(rng.integers(0, 1000))}

    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": write_shards(samples(), out, "train", shard_size)}
    (out / INDEX).write_text(json.dumps({"format": FORMAT, "class_names": [], "splits": splits}))
    return sum(p.stat().st_size for p in out.iterdir()) / 2**20


def peak_rss_mb() -> tuple[float, float]:
    """(this process, the largest finished child) peak resident set in MB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def child_loader(shards: str, px: int, workers: int, batch: int, max_images: int) -> dict:
    import torch

    from textok.data.shards import ShardSet

    torch.set_num_threads(1)
    base = peak_rss_mb()[0]
    data = ShardSet(shards, "train", px)
    stream = data.stream(batch, workers=workers, shuffle_buffer=1000)
    n_batches = min(stream.batches_per_epoch(), max(1, max_images // batch))
    it = stream.batches(0)
    next(it)  # start-up (workers forking, first window) is not throughput
    t0, images = time.perf_counter(), 0
    for _ in range(n_batches - 1):
        images += len(next(it)["captions"])
    elapsed = time.perf_counter() - t0
    del it
    main, kids = peak_rss_mb()
    return {"images": images, "images_per_s": images / elapsed, "rss_start_mb": base, "peak_rss_mb": main,
            "peak_worker_rss_mb": kids if workers else 0.0}


def child_train(shards: str, steps: int, batch: int, out: str) -> dict:
    import torch

    from textok.train.config import load_train_config
    from textok.train.tokenizer import train_tokenizer

    torch.set_num_threads(1)
    cfg = load_train_config("textok-demo", [f"data.source={shards}", f"batch_size={batch}", f"max_steps={steps}",
                                            "loss.perceptual=none", "loss.adversarial.weight=0", "sample_every=0",
                                            f"ckpt_every={steps}", f"log_every={max(1, steps // 4)}",
                                            "data.val_split=train", "device=cpu"])
    t0 = time.perf_counter()
    train_tokenizer(cfg, out, progress=False)
    elapsed = time.perf_counter() - t0
    log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    steady = [e["images_per_s"] for e in log[1:]] or [log[-1]["images_per_s"]]
    main, _ = peak_rss_mb()
    return {"steps": steps, "images_per_s": sum(steady) / len(steady), "wall_s": elapsed, "peak_rss_mb": main}


def run_child(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--px", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second loader case")
    p.add_argument("--steps", type=int, default=60, help="training steps of the tiny run")
    p.add_argument("--workdir", default="/tmp/textok-data-scale")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/data-scale-cpu.json"))
    p.add_argument("--child", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "loader":
            shards, px, workers, batch, max_images = rest
            print(json.dumps(child_loader(shards, int(px), int(workers), int(batch), int(max_images))))
        else:
            shards, steps, batch, out = rest
            print(json.dumps(child_train(shards, int(steps), int(batch), out)))
        return

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TEXTOK_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    rows, results = [], {"machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared)", "px": args.px,
                         "batch": args.batch, "targets": {"loader_images_per_s": GPU_L2_STEP,
                                                           "full_step_images_per_s": GPU_FULL_STEP,
                                                           "rss_growth": 0.10}, "sizes": {}}
    try:
        for n in args.sizes:
            shards = work / f"set-{n}"
            t0 = time.perf_counter()
            disk = build_set(shards, n, args.px, args.shard_size)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            enc = subprocess.run([sys.executable, "-c", "import sys; from textok.cli import main; sys.exit(main(sys.argv[1:]))",
                                  "encode-captions", str(shards), "--splits", "train",
                                  "--no-progress", "--device", "cpu"], capture_output=True, text=True, env=env)
            if enc.returncode != 0:
                raise SystemExit(enc.stderr[-2000:])
            encode_s = time.perf_counter() - t0
            res = {"disk_mb": disk, "build_s": build_s, "encode_captions_s": encode_s}
            for w in (0, args.workers):
                res[f"loader_w{w}"] = run_child(["loader", str(shards), str(args.px), str(w), str(args.batch), str(n)], env)
            res["train"] = run_child(["train", str(shards), str(args.steps), "32", str(work / f"run-{n}")], env)
            results["sizes"][n] = res
            for w in (0, args.workers):
                r = res[f"loader_w{w}"]
                rows.append({"images": n, "case": f"loader, {w} workers", "images/s": f"{r['images_per_s']:.0f}",
                             "peak RSS MB": f"{r['peak_rss_mb']:.0f}" + (f" (+{r['peak_worker_rss_mb']:.0f}/worker)" if w else "")})
            rows.append({"images": n, "case": f"train textok-demo + text, batch 32", "images/s":
                         f"{res['train']['images_per_s']:.0f}", "peak RSS MB": f"{res['train']['peak_rss_mb']:.0f}"})
            shutil.rmtree(work / f"run-{n}", ignore_errors=True)
        # the decode rate at the paper's resolution: how many workers one GPU needs
        big = work / "set-256px"
        build_set(big, 1500, 256, 250)
        r256 = run_child(["loader", str(big), "256", "0", "32", "1500"], env)
        results["decode_256px_one_process"] = r256
        rows.append({"images": 1500, "case": "loader at 256 px, 0 workers", "images/s": f"{r256['images_per_s']:.0f}",
                     "peak RSS MB": f"{r256['peak_rss_mb']:.0f}"})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    sizes = sorted(results["sizes"])
    if len(sizes) >= 2:
        lo, hi = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
        growth = {k: hi[k]["peak_rss_mb"] / lo[k]["peak_rss_mb"] - 1
                  for k in ("loader_w0", f"loader_w{args.workers}", "train")}
        results["rss_growth"] = growth
    results["workers_per_gpu_at_256px"] = GPU_L2_STEP / results["decode_256px_one_process"]["images_per_s"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in rows[0]}
    print("  ".join(c.ljust(w) for c, w in widths.items()))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in widths.items()))
    if "rss_growth" in results:
        print("peak RSS growth {} -> {}: ".format(sizes[0], sizes[-1]) +
              ", ".join(f"{k} {v * 100:+.1f}%" for k, v in results["rss_growth"].items()) + " (goal <= +10%)")
    print(f"loader target: >= {GPU_L2_STEP} images/s per GPU (ViT-B/16 l2 step, H200); at 256 px one process decodes "
          f"{results['decode_256px_one_process']['images_per_s']:.0f}/s, so ~{results['workers_per_gpu_at_256px']:.1f} "
          "workers per GPU")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
