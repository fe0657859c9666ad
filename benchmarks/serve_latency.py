"""Request latency of ``textok serve``: the page's requests over a real socket, timed end to end (JSON + PNGs).

    python benchmarks/serve_latency.py --model runs/demo/textok/final --model runs/demo/baseline/final \
        --generator runs/demo-gen/dit/final --out benchmarks/results/serve-latency-cpu.json

Each kind of request runs ``--n`` times after one warm-up; captions change from request to request (held-out
scenes' own captions) so the text encoder runs every time unless the row says "same caption".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import torch
from PIL import Image


def post(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    kind = "application/json" if body.startswith(b"{") else "application/octet-stream"
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": kind})
    with urllib.request.urlopen(req, timeout=300) as res:
        res.read()
        assert res.status == 200
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--generator")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU machines are shared)")
    ap.add_argument("--out", help="write the table as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from textok.apps.serve import ServeApp, make_server
    from textok.data.scenes import CaptionedScenes

    app = ServeApp(args.model, args.generator)
    app.warm_up()
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scenes = CaptionedScenes(image_size=32, split="test")
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (30, 120, 200)).save(buf, format="JPEG", quality=90)
    photo = buf.getvalue()

    def rec(i: int, swap: bool = False, same: bool = False) -> bytes:
        i %= len(scenes) - 1
        caps = scenes.captions_of(i)  # five phrasings per scene: each kind of request gets its own
        body = {"scene": i, "caption": scenes.captions_of(0)[4] if same else caps[2] if swap else caps[0],
                "swap_caption": scenes.captions_of(i + 1)[3] if swap else ""}
        return json.dumps(body).encode()

    kinds = {
        "reconstruct (new caption)": lambda i: post(server.url + "api/reconstruct", rec(i)),
        "reconstruct + swap (2 new captions)": lambda i: post(server.url + "api/reconstruct", rec(i, swap=True)),
        "reconstruct (same caption)": lambda i: post(server.url + "api/reconstruct", rec(i, same=True)),
        "upload (640x480 JPEG)": lambda i: post(server.url + "api/upload", photo),
    }
    if app.pipe is not None:
        label = {"label": 0} if app.pipe.num_classes else {"prompt": "a red circle"}
        kinds["sample 4 (default steps)"] = lambda i: post(
            server.url + "api/generate", json.dumps({**label, "n": 4, "seed": i}).encode())
    rows = []
    for name, fn in kinds.items():
        fn(10_000)  # warm-up
        times = sorted(fn(100 + i) for i in range(args.n))
        rows.append({"request": name, "median_ms": round(statistics.median(times), 1),
                     "p90_ms": round(times[int(0.9 * (len(times) - 1))], 1), "max_ms": round(times[-1], 1)})
        print(f"{name:40s} median {rows[-1]['median_ms']:7.1f} ms  p90 {rows[-1]['p90_ms']:7.1f}  max {rows[-1]['max_ms']:7.1f}")
    server.shutdown()
    if args.out:
        info = {"models": args.model, "generator": args.generator, "n": args.n, "torch_threads": args.threads,
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "load_average": os.getloadavg(), "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
