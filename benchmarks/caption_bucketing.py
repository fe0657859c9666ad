"""What encoding captions shortest first saves: `TextStateStore.fill` (behind `textok encode-captions` and a
run's text states) batches a segment's captions by length, so each batch pads less. Times the same captions
encoded in the store's earlier alphabetical order and by length, counts the padded token slots, prints a table
and writes JSON.

Captions: every caption of a ``captions.jsonl`` (``--captions``; e.g. one inside a data set), else the embedded
scenes' training captions. Encoder: ``--encoder`` (default: textok's default, MiniLM).

    python benchmarks/caption_bucketing.py --captions captions.jsonl --num 4000
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from common import device_name, print_table, write_json  # noqa: E402
from textok.text.encoders import load_text_encoder  # noqa: E402


def read_captions(path: str | None, num: int) -> tuple[list[str], str]:
    if path is None:
        from textok.data.scenes import CaptionedScenes

        scenes = CaptionedScenes(image_size=32, split="train", size=max(num // 2, 1), cache=False)
        caps = {c for i in range(len(scenes)) for c in scenes[i]["captions"]}
        return sorted(caps)[:num], "the embedded scenes (train)"
    p = Path(path)
    if tarfile.is_tarfile(p):  # a captions.jsonl inside a data tar
        with tarfile.open(p) as tar:
            text = tar.extractfile("captions.jsonl").read().decode()
    else:
        text = p.read_text()
    caps = {c.strip() for line in text.splitlines() if line.strip() for c in json.loads(line)["captions"] if c.strip()}
    return sorted(caps)[:num], p.name


def run(encoder, captions: list[str], batch: int) -> tuple[float, int]:
    """(seconds, padded token slots) to encode ``captions`` in this order in batches of ``batch``."""
    slots = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            emb = encoder.encode(captions[i : i + batch])
            slots += emb.mask.numel()
    return time.perf_counter() - t0, slots


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", default=None)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "caption-bucketing-cpu.json"))
    args = ap.parse_args(argv)
    caps, source = read_captions(args.captions, args.num)
    enc = load_text_encoder(args.encoder, args.max_length)
    enc.encode(caps[: min(8, len(caps))])  # warm-up
    rows = []
    for order, ordered in (("alphabetical (before)", sorted(caps)), ("by length (fill now)", sorted(caps, key=len))):
        seconds, slots = run(enc, ordered, args.batch)
        rows.append({"order": order, "captions": len(caps), "seconds": round(seconds, 2),
                     "captions/s": round(len(caps) / seconds, 1), "padded token slots": slots})
    real = sum(int(m.sum()) for m in [enc.encode(caps[i:i + args.batch]).mask for i in range(0, len(caps), args.batch)])
    for r in rows:
        r["padding share"] = f"{1 - real / r['padded token slots']:.1%}"
    print(f"{len(caps)} captions of {source}, encoder {args.encoder}, batch {args.batch}, {device_name(torch.device('cpu'))}")
    print_table(rows)
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"by length: {speedup:.2f}x the captions per second")
    result = {"source": source, "encoder": args.encoder, "batch": args.batch, "device": device_name(torch.device("cpu")),
              "rows": rows, "speedup": round(speedup, 3)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
