"""``textok demo``: the main job. Train TexTok and the no-text baseline with the same budget on the embedded
captioned scenes, evaluate both on held-out scenes, and show what text buys.

Writes ``OUT/grid.png`` (originals | baseline | TexTok, with captions), ``OUT/metrics.json`` and
``OUT/report.md``, and prints the comparison table. Each model is a resumable run under ``OUT/<name>/``:
re-running the demo skips finished training and only re-evaluates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ...data.factory import build_dataset
from ...data.folder import collate
from ...eval.compare import higher_is_better
from ...eval.reconstruction import evaluate_tokenizer
from ...io import atomic_write_text
from ...models.registry import load_tokenizer
from ...report import captioned_grid, print_table
from ...train.config import load_train_config
from ...train.tokenizer import train_tokenizer

RUNS = {  # name -> its own overrides; everything else (data, budget, seed) is shared
    "baseline": {"model.text_in_encoder": False, "model.text_in_decoder": False},
    "textok": {},
}
LABELS = {"baseline": "baseline (no text)", "textok": "TexTok (text in encoder + decoder)"}
QUICK = {"max_steps": 3, "data.train_size": 64, "data.val_size": 16, "batch_size": 8, "log_every": 1,
         "model.num_tokens": 4, "loss.perceptual_size": 32, "ckpt_every": 3, "optim.warmup_steps": 1}  # for tests


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, quick: bool = False, recipe: str = "demo") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"text_cache": str(out / "text_cache.safetensors"), **(QUICK if quick else {}),
                 **({"max_steps": steps} if steps is not None else {})}
    base = load_train_config(recipe, overrides)
    finals, seconds = {}, {}
    for name, own in RUNS.items():
        cfg = load_train_config(recipe, {**overrides, **own})
        print(f"\n== training {LABELS[name]}: {cfg.max_steps} steps of {cfg.batch_size} images ==")
        t0 = time.time()
        finals[name] = train_tokenizer(cfg, out / name)
        seconds[name] = round(time.time() - t0, 1)

    # ---- evaluation on held-out scenes ---------------------------------------------------------
    models = {name: load_tokenizer(path).eval() for name, path in finals.items()}
    image_size = next(iter(models.values())).config.image_size
    val = build_dataset(base.data.source, base.data.val_split, image_size, size=base.data.val_size, seed=base.data.seed)
    num = len(val)
    metrics = {}
    for name, model in models.items():
        print(f"evaluating {LABELS[name]} on {num} held-out scenes")
        metrics[name] = evaluate_tokenizer(model, val, num=num, batch_size=64, fd_size=base.loss.perceptual_size,
                                           progress=False)
    rows = _table(metrics)
    _grid(models, val, out / "grid.png")
    result = {"recipe": recipe, "train_config": base.to_dict(), "train_seconds": seconds, "val_images": num,
              "metrics": metrics, "table": rows}
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out / "report.md", _report(result, base))
    print()
    print_table(rows)
    print(f"\nwrote {out / 'grid.png'}, {out / 'metrics.json'}, {out / 'report.md'}")
    return result


def _metric_names(metrics: dict) -> list[str]:
    first = next(iter(metrics.values()))
    return [k for k, v in first.items() if isinstance(v, (int, float)) and k not in ("num_images",)]


def _table(metrics: dict) -> list[dict]:
    rows = []
    for key in _metric_names(metrics):
        base, text = metrics["baseline"][key], metrics["textok"][key]
        higher = higher_is_better(key)
        better = text > base if higher else text < base
        rel = (text - base) / abs(base) * 100 if base else float("nan")
        rows.append({"metric": key + (" (higher is better)" if higher else " (lower is better)"),
                     "baseline": f"{base:.4f}", "TexTok": f"{text:.4f}", "change": f"{rel:+.1f}%",
                     "text helps": "yes" if better else "no"})
    return rows


def _report(result: dict, cfg) -> str:
    rows = result["table"]
    lines = ["# textok demo: TexTok vs the no-text baseline", "",
             f"Same budget for both: {cfg.max_steps} steps × {cfg.batch_size} images on the embedded captioned "
             f"scenes ({cfg.data.train_size or 4000} training images, {cfg.data.captions_per_image or 5} captions each, "
             f"one picked at random per step), model `{cfg.model}`, seed {cfg.seed}. Evaluated on "
             f"{result['val_images']} held-out scenes with their first caption.", "",
             "| metric | baseline | TexTok | change | text helps |", "|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['baseline']} | {r['TexTok']} | {r['change']} | {r['text helps']} |" for r in rows]
    notes = result["metrics"]["textok"].get("metric_notes") or {}
    skipped = result["metrics"]["textok"].get("skipped") or {}
    lines += ["", "Training time (s): " + ", ".join(f"{LABELS[k]} {v}" for k, v in result["train_seconds"].items()), ""]
    if notes:
        lines += ["Notes on the metrics:", ""] + [f"- **{k}**: {v}" for k, v in notes.items()] + [""]
    if skipped:
        lines += ["Not computed here:", ""] + [f"- **{k}**: {v}" for k, v in skipped.items()] + [""]
    lines += ["![originals | baseline | TexTok](grid.png)", ""]
    return "\n".join(lines)


@torch.no_grad()
def _grid(models: dict, dataset, path: Path, count: int = 6) -> None:
    """Rows: original | baseline | TexTok, upscaled, with the caption beside them."""
    batch = collate([dataset[i] for i in range(min(count, len(dataset)))])
    captions = [c[0] for c in batch["captions"]]
    recon = {name: model(batch["image"], captions if model.config.uses_text else None)[0].clamp(-1, 1)
             for name, model in models.items()}
    captioned_grid({"original": batch["image"], "baseline": recon["baseline"], "TexTok": recon["textok"]}, captions, path)
