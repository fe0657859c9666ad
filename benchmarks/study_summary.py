"""One table over several ``textok study`` runs: what each change of recipe does to the gain from text.

Each study is one factor (token budget, captions, losses, training length, ...) changed against a reference
recipe; this reads their ``results.json`` and prints, per study and token count, the no-text value, each text
mode's value and the relative gain of the best text mode, for PSNR and the FD metric, plus C4 when the study
ran ``--generation``. Writes Markdown and JSON.

    python benchmarks/study_summary.py --out benchmarks/results/study-factors-flickr8k-32px-cpu \\
        "reference=benchmarks/results/study-flickr8k-32px-cpu" "N=1, all captions=runs/study-flickr-32"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textok.report import markdown_table  # noqa: E402
from textok.apps.study.cells import MODE_LABELS  # noqa: E402
from textok.eval.compare import relative_gain  # noqa: E402


def rows_for(label: str, result: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (token count, headline metric) of one study.

    A factor study that trained text cells only borrows its no-text cells from ``baseline`` (the reference
    study it changes one setting of), so its gain is measured against the same no-text tokenizer."""
    rows = []
    text_modes = [m for m in ("decoder", "encoder", "both") if m in result["modes"]]
    metrics = [m for m in result["metrics"] if m == "PSNR" or m.startswith("FD-") or m == "rFID"]
    for n in result["tokens"]:
        for metric in metrics:
            higher = result["higher_is_better"][metric]
            value = {m: result["cells"][f"n{n}-{m}"]["metrics"][metric] for m in result["modes"]}
            if "none" not in value and baseline is not None and f"n{n}-none" in baseline["cells"]:
                value["none"] = baseline["cells"][f"n{n}-none"]["metrics"][metric]
            row: dict[str, Any] = {"study": label, "tokens": n, "metric": f"{metric} ({'↑' if higher else '↓'})",
                                   "no text": round(value["none"], 3) if "none" in value else None}
            row.update({MODE_LABELS[m]: round(value[m], 3) if m in value else "" for m in ("decoder", "encoder", "both")})
            row["best text gain"] = row["its cost of a wrong caption"] = ""
            if "none" in value and text_modes:
                best = (max if higher else min)(text_modes, key=value.__getitem__)
                gain = relative_gain(value[best], value["none"], higher)
                row["best text gain"] = f"{gain * 100:+.1f}% ({best})"
                wrong = result["cells"][f"n{n}-{best}"].get("metrics_wrong_caption", {}).get(metric)
                row["its cost of a wrong caption"] = (
                    "" if wrong is None else f"{relative_gain(value[best], wrong, higher) * 100:+.1f}%")
            rows.append(row)
    return rows


def generation_row(label: str, result: dict[str, Any]) -> dict[str, Any] | None:
    gen = result.get("generation")
    if not isinstance(gen, dict):
        return None
    runs = gen["runs"]
    t, b = runs[f"n{gen['tokens']}-{gen['text_mode']}"], runs[f"n{gen['tokens']}-none"]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"study": label, "tokens": gen["tokens"], "metric": f"{gen['metric']} of samples (↓)",
            "text mode": gen["text_mode"], "no text": round(mean(b["sample_fd"]), 2),
            "text": round(mean(t["sample_fd"]), 2), "gain": f"{gen['relative_gain'] * 100:+.1f}%",
            "verdict": gen["verdict"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="+", metavar="LABEL=DIR[@BASE]",
                   help="a label and a study directory (with results.json); @BASE names the study whose no-text "
                        "cells a text-only factor study is compared with")
    p.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    args = p.parse_args(argv)
    rows, gen_rows, sources = [], [], {}
    for spec in args.studies:
        label, _, directory = spec.rpartition("=")
        directory, _, base_dir = directory.partition("@")
        if not label:
            p.error(f"{spec!r}: give LABEL=DIR")
        result, baseline = _load(p, directory), (_load(p, base_dir) if base_dir else None)
        sources[label] = {"dir": directory, "recipe": result["recipe"], "data": result["data"],
                          "max_steps": result["max_steps"], "batch_size": result["batch_size"],
                          "overrides": _recipe_changes(result), "no text from": base_dir or directory}
        rows += rows_for(label, result, baseline)
        g = generation_row(label, result)
        if g:
            gen_rows.append(g)
    md = ["# What changes the gain from text", "", "Generated by `benchmarks/study_summary.py` from each study's "
          "`results.json`; relative gain = how much better the best text mode is than no text (positive = text "
          "better); its cost of a wrong caption = how much better that cell is with its own caption than with the "
          "next image's (0% = the text is ignored).", "", markdown_table(rows), ""]
    if gen_rows:
        md += ["Generation (C4):", "", markdown_table(gen_rows), ""]
    md += ["Studies:", "", markdown_table([{"study": k, **{kk: str(vv) for kk, vv in v.items()}}
                                           for k, v in sources.items()]), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md))
    result = {"rows": rows, "generation": gen_rows, "studies": sources}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(md))
    return result


def _load(parser: argparse.ArgumentParser, directory: str) -> dict[str, Any]:
    path = Path(directory) / "results.json"
    if not path.is_file():
        parser.error(f"{path} does not exist: run the study first")
    return json.loads(path.read_text())


def _recipe_changes(result: dict[str, Any]) -> str:
    """The data/loss settings that usually differ between factor studies, in one line."""
    cfg = result["train_config"]
    d, loss = cfg["data"], cfg["loss"]
    perceptual = loss["perceptual"] + (f"@{loss['perceptual_size']}" if loss["perceptual"] == "opennsfw" else "")
    stage = (f", a second stage from `{Path(cfg['init_from']).parents[2].name}` (lr {cfg['optim']['lr']})"
             if cfg.get("init_from") else "")
    per_cell = ("num_tokens", "text_in_encoder", "text_in_decoder")
    overrides = cfg.get("model_overrides") or {}  # typed {key: value}; runs written before: ["key=value", ...]
    pairs = ([(k, json.dumps(v) if isinstance(v, bool) else v) for k, v in overrides.items()]
             if isinstance(overrides, dict) else [o.split("=", 1) for o in overrides])
    model = [f"{k}={v}" for k, v in pairs if k not in per_cell]
    text = "".join(f", {name}={value}" for name, value in (("text dropout", cfg.get("text_dropout", 0.0)),
                                                           ("text-grounding weight", loss.get("text_contrast_weight", 0.0)))
                   if value)
    return (f"train_size={d['train_size'] or 'all'}, captions/image={d['captions_per_image'] or 'all'}, "
            f"perceptual={perceptual}, gan weight={loss['adversarial']['weight']}, steps={cfg['max_steps']}, "
            f"seed={cfg['seed']}{stage}{text}" + (f", model {' '.join(model)}" if model else ""))


if __name__ == "__main__":
    main()
