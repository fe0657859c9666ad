"""Uncaptioned shards -> captioned shards at growing size: what `make-shards SHARD_DIR` holds in memory.

Builds ImageNet-style shard directories (``{key}.jpg`` + ``{key}.cls``, 1000 samples a tar, small JPEGs) of each
``--sizes`` with a captions.jsonl (one ~12-word caption per image, as `textok caption` writes it), then in a fresh
process per size measures:

* the index alone (:class:`textok.data.shard_source.ShardSource`): its bytes per sample (RSS growth while it is
  built, divided by the samples) and the seconds to read every tar's headers and labels;
* the captions file read into memory (:func:`read_captions`): bytes per sample;
* the whole ``make_shards`` (seeded shuffle, bytes copied): seconds, images/s and the process's peak RSS.

Prints a table and writes JSON to benchmarks/results/. The data is written under ``--workdir`` and removed.

    python benchmarks/reshard_memory.py                        # 10k and 100k
    python benchmarks/reshard_memory.py --sizes 2000 --out /tmp/x.json   # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("red blue green yellow small large round square bird dog cat flower tree car house boat sky field river "
         "mountain street sitting standing flying under over near beside a the with on in of and").split()


def build(root: Path, n: int, per_tar: int = 1000, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    images = []
    for i in range(64):  # 64 distinct 32-px JPEGs, reused: the index and the copy do not look at pixels
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    root.mkdir(parents=True)
    lines = []
    for t in range((n + per_tar - 1) // per_tar):
        with tarfile.open(root / f"imagenet-train-{t:06d}.tar", "w") as tar:
            for i in range(t * per_tar, min(n, (t + 1) * per_tar)):
                key = f"n{i % 1000:08d}_{i}"
                for ext, data in (("cls", str(i % 1000).encode()), ("jpg", images[i % 64])):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                caption = " ".join(words.choice(WORDS) for _ in range(12))
                lines.append(json.dumps({"file": f"imagenet-train-{t:06d}.tar/{key}", "captions": [caption],
                                         "label": i % 1000}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from textok.data.make_shards import make_shards
from textok.data.shard_source import ShardSource, read_captions

def rss():  # current resident set, bytes
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

root, out = Path(sys.argv[1]), Path(sys.argv[2])
r0 = rss(); t0 = time.perf_counter()
source = ShardSource(root)
t_index = time.perf_counter() - t0; r1 = rss()
captions = read_captions(root / "captions.jsonl")
r2 = rss()
n = len(source.samples)
del source, captions
t0 = time.perf_counter()
make_shards(root, out, splits=("train",), shard_size=1000, progress=False)
t_make = time.perf_counter() - t0
print(json.dumps({"samples": n, "index_bytes_per_sample": (r1 - r0) / n, "index_s": t_index,
                  "captions_bytes_per_sample": (r2 - r1) / n, "make_shards_s": t_make,
                  "images_per_s": n / t_make,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--workdir", default="/tmp/textok-reshard-bench")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reshard-memory-cpu.json"))
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            build(work / f"src-{n}", n)
            env = dict(os.environ, OMP_NUM_THREADS="1")
            done = subprocess.run([sys.executable, "-c", MEASURE, str(work / f"src-{n}"), str(work / f"out-{n}"),
                                   str(ROOT / "src")], env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            shutil.rmtree(work / f"src-{n}")
            shutil.rmtree(work / f"out-{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'samples':>8} {'index B/sample':>15} {'index s':>8} {'captions B/sample':>18} {'make-shards s':>14} "
          f"{'images/s':>9} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['samples']:>8} {r['index_bytes_per_sample']:>15.0f} {r['index_s']:>8.2f} "
              f"{r['captions_bytes_per_sample']:>18.0f} {r['make_shards_s']:>14.1f} {r['images_per_s']:>9.0f} "
              f"{r['peak_rss_mb']:>12.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                          "python": platform.python_version(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
