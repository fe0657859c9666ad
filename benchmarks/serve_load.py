"""Load on ``textok serve``: requests/s and p50/p90 latency of reconstruct and generate at 1, 4 and 16 clients.

    python benchmarks/serve_load.py --label after            # tiny random models made on the spot
    python benchmarks/serve_load.py --label after --model runs/demo/textok/final --generator runs/demo-gen/dit/final
    PYTHONPATH=/path/to/old-checkout/src python benchmarks/serve_load.py --label before   # another version's server

The server is started as a user starts it (``textok serve --port 0`` in a subprocess, one torch thread) and
only ever reached on 127.0.0.1. Each (request, clients) cell runs its clients until ``--requests`` answers
came back or ``--seconds`` passed, whichever is first; the whole run stops after ``--deadline`` seconds even
if the server hangs, and the server is stopped with SIGTERM at the end. Reconstructions use held-out scenes
with their own captions, warmed once, so the text encoder's cache is hot: the figures are the models, the
PNGs and the HTTP stack. Writes ``benchmarks/results/serve-load-LABEL-cpu.json``; with both a ``before`` and
an ``after`` JSON there, also ``serve-load-cpu.md`` comparing them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from common import print_table, write_json

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = (1, 4, 16)


def make_tiny_models(root: Path) -> tuple[list[str], str]:
    """Two random-weight ``textok-tiny`` tokenizers (text, no text) and a 2-step DiT on the no-text tokens."""
    import torch

    from textok.generate import extract_latents
    from textok.models.textok import TexTok, TexTokConfig
    from textok.train.config import load_generator_config
    from textok.train.generator import train_generator

    torch.manual_seed(0)
    torch.set_num_threads(1)
    TexTok(TexTokConfig.preset("textok-tiny")).save_pretrained(root / "text")
    TexTok(TexTokConfig.preset("textok-tiny").override(["text_in_encoder=false", "text_in_decoder=false"])
           ).save_pretrained(root / "notext")
    extract_latents(root / "notext", "scenes", root / "lat", num=16, batch_size=16, progress=False)
    cfg = load_generator_config("dit-tiny", [f"latents={root / 'lat'}", "model.width=32", "model.depth=1",
                                             "model.heads=2", "batch_size=8", "max_steps=2", "diffusion=flow"])
    return [str(root / "text"), str(root / "notext")], str(train_generator(cfg, root / "dit", progress=False))


def start_server(models: list[str], generator: str | None, timeout: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-c", "import sys; from textok.cli import main; sys.exit(main())", "serve",
           "--host", "127.0.0.1", "--port", "0"]
    for m in models:
        cmd += ["--model", m]
    cmd += ["--generator", generator] if generator else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # the process ended

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + timeout
    log = []
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        log.append(line)
        if "ready at " in line:
            url = line.split("ready at ", 1)[1].split()[0]
            if urlparse(url).hostname != "127.0.0.1":
                proc.terminate()
                raise SystemExit(f"the server is not on loopback: {url}")
            return proc, url
    proc.kill()
    raise SystemExit("textok serve did not start:\n" + "".join(log))


def one_cell(url: str, path: str, bodies: list[bytes], clients: int, max_requests: int, seconds: float) -> dict:
    """``clients`` threads, each with its own keep-alive connection, post until the budget is spent."""
    target = urlparse(url)
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    issued = [0]
    stop_at = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        while True:
            with lock:
                if issued[0] >= max_requests or time.monotonic() >= stop_at:
                    break
                body = bodies[issued[0] % len(bodies)]
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                               "Origin": url.rstrip("/")})
                res = conn.getresponse()
                data = res.read()
                ok = res.status == 200
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                ok, data = False, str(err).encode()
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                (latencies.append(dt) if ok else failures.append(data[:200].decode(errors="replace")))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 130)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
    return {"clients": clients, "ok": len(lat), "failed": len(failures), "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2) if wall else None, "p50_ms": pick(0.5), "p90_ms": pick(0.9),
            "first_failure": failures[0] if failures else None}


def write_markdown() -> None:
    runs = {label: json.loads((RESULTS / f"serve-load-{label}-cpu.json").read_text())
            for label in ("before", "after") if (RESULTS / f"serve-load-{label}-cpu.json").exists()}
    if len(runs) < 2:
        return
    lines = ["# `textok serve` under load: before (http.server) and after (FastAPI + uvicorn)", "",
             "Made by `benchmarks/serve_load.py` (see its docstring). Same machine, same tiny random models, one torch",
             "thread in the server, loopback only. Load averages at the start of each run: "
             + ", ".join(f"{k} {v['load_average'][0]:.1f}" for k, v in runs.items())
             + " (a shared 2-core machine: read the ratios, not the absolute figures).", "",
             "| request | clients | before req/s | after req/s | before p50 / p90 ms | after p50 / p90 ms | failed (before / after) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b, a in zip(runs["before"]["rows"], runs["after"]["rows"]):
        lines.append(f"| {b['request']} | {b['clients']} | {b['requests_per_s']} | {a['requests_per_s']} | "
                     f"{b['p50_ms']} / {b['p90_ms']} | {a['p50_ms']} / {a['p90_ms']} | {b['failed']} / {a['failed']} |")
    (RESULTS / "serve-load-cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'serve-load-cpu.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="before / after: names the JSON")
    ap.add_argument("--model", action="append", default=[], help="tokenizer directories (default: tiny random ones)")
    ap.add_argument("--generator", help="a generator directory (default: a tiny DiT made with the tiny models)")
    ap.add_argument("--requests", type=int, default=96, help="answers per cell at most")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per cell at most")
    ap.add_argument("--deadline", type=float, default=600.0, help="the whole run stops after this many seconds")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps per generate request")
    args = ap.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(SystemExit("serve_load: deadline passed")))
    signal.alarm(int(args.deadline))
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        models, generator = (args.model, args.generator) if args.model else make_tiny_models(Path(tmp))
        from textok.data.scenes import CaptionedScenes

        scenes = CaptionedScenes(image_size=32, split="test")
        recon = [json.dumps({"scene": i, "caption": scenes.captions_of(i)[0]}).encode() for i in range(32)]
        gen = [json.dumps({"label": i % 4, "n": 2, "seed": i, "steps": args.steps}).encode() for i in range(8)]
        load = os.getloadavg()
        proc, url = start_server(models, generator, timeout=300)
        rows = []
        try:
            one_cell(url, "/api/reconstruct", recon, 4, len(recon), 120)  # warm the text cache
            one_cell(url, "/api/generate", gen[:2], 1, 2, 60)
            for name, path, bodies in (("reconstruct", "/api/reconstruct", recon), ("generate", "/api/generate", gen)):
                for clients in CLIENTS:
                    row = {"request": name, **one_cell(url, path, bodies, clients, args.requests, args.seconds)}
                    rows.append(row)
                    print(f"{name:12s} {clients:2d} clients: {row['requests_per_s']} req/s, p50 {row['p50_ms']} ms, "
                          f"p90 {row['p90_ms']} ms, {row['failed']} failed", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    print_table([{k: v for k, v in r.items() if k != "first_failure"} for r in rows])
    write_json(RESULTS / f"serve-load-{args.label}-cpu.json", {
        "label": args.label, "models": args.model or "tiny random (textok-tiny, text + no text; 2-step DiT)",
        "requests_per_cell": args.requests, "seconds_per_cell": args.seconds, "generate_steps": args.steps,
        "server_exit_code": code, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_average": load, "rows": rows})
    write_markdown()


if __name__ == "__main__":
    main()
