"""Training steps/s of `make demo`'s TexTok at each torch thread count, on this machine as it is and with extra
busy processes: which thread count pays, and whether textok's default (``textok.threads.default_threads``:
usable physical cores minus the rounded load average) picks it.

Each measurement runs in its own process (torch's thread pool is set before any work), timing the demo's training
step (textok-demo, 32 images, ~40 text tokens, ℓ2 loss: forward + backward + AdamW + EMA). The busy processes
are plain Python loops started and stopped by this script.

    python benchmarks/threads.py                          # threads 1..cores, 0 and 1 extra busy processes
    python benchmarks/threads.py --busy 0 1 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def child(threads: int, steps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from train_step import bench

    row = bench("textok-demo", 32, True, 40, steps, "fp32", False, "l2", torch.device("cpu"))
    print(json.dumps({"steps_per_s": row["images/s"] / 32}))


def measure(threads: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["steps_per_s"]


def main() -> None:
    from common import print_table, write_json

    from textok.threads import busy_cores, default_threads, usable_cores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="extra busy processes to run beside")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default 1..logical CPUs)")
    p.add_argument("--steps", type=int, default=15, help="timed steps per measurement (median)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "threads.json"))
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.steps)
        return
    cores = usable_cores()
    counts = args.threads or list(range(1, (os.cpu_count() or 1) + 1))
    rows = []
    for busy in args.busy:
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(2.0 if busy else 0.0)
            load = os.getloadavg()[0]
            picked = default_threads(cores, busy_cores())
            speeds = {t: measure(t, args.steps) for t in counts}
        finally:
            for loop in loops:
                loop.terminate()
                loop.wait()
        best = max(speeds, key=speeds.get)
        for t, s in speeds.items():
            rows.append({"extra busy processes": busy, "load avg (1 min) before": round(load, 2), "threads": t,
                         "steps/s": round(s, 2), "vs best": f"{s / speeds[best]:.2f}",
                         "default picks": "yes" if t == picked else ""})
    print(f"{cores} usable physical cores, {os.cpu_count()} logical CPUs")
    print_table(rows)
    write_json(args.out, {"usable_cores": cores, "logical_cpus": os.cpu_count(), "rows": rows})


if __name__ == "__main__":
    main()
