"""The study's report: the tables and verdicts assembled from the cells' metrics (``results.json``), and
``report.md`` with its plots and reconstruction grid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ...eval.bootstrap import LEVEL
from ...eval.compare import higher_is_better, relative_gain
from ...eval.reconstruction import reconstruct_batches
from ...io import atomic_write_text
from ...models.registry import load_tokenizer
from ...report import captioned_grid, line_plot, markdown_table, print_table
from .cells import MODE_LABELS, cell_name, numeric
from .claims import ORDER_C3, describe, primary_metrics, token_list, verdict_lines, verdicts, word
from .intervals import FD_REPS, SWAPS, replicates, swap_costs

GRID_ORDER = ("none", "decoder", "encoder", "both")
GRID_IMAGES = 6
OUTCOME_WORDS = {"better": "yes", "worse": "no", "undecided": "undecided"}


def assemble(recipe: str, base, tokens: list[int], modes: list[str], cells: dict[str, dict],
             eval_settings: dict, arrays: dict[str, dict] | None = None, reps: int = 0,
             seeds: dict[str, dict[int, dict[str, list[float]]]] | None = None) -> dict[str, Any]:
    """The content of ``results.json``: tables and verdicts from the per-cell metrics (``base``: the shared
    training config). ``arrays`` (each cell's per-image values, :func:`.intervals.load_cells`) and ``reps`` > 0:
    paired bootstrap intervals; ``seeds``: the cells' values under other training seeds. Either lets a verdict
    be "undecided"."""
    scores = {name: numeric(c["metrics"]) for name, c in cells.items()}
    metrics = [k for k in next(iter(scores.values())) if all(k in m for m in scores.values())]
    by_mode = {m: {n: scores[cell_name(n, m)] for n in tokens} for m in modes}
    noisy = bool(arrays) and reps > 0
    boot = replicates(arrays, tokens, modes, metrics, reps) if noisy else None
    swaps = swap_costs(arrays, reps) if noisy else {}
    claims = verdicts(by_mode, metrics, boot, seeds)
    primary = primary_metrics(metrics)
    paper_rows, ablation_rows = [], []
    for metric in metrics:
        higher = higher_is_better(metric)
        label = f"{metric} ({'↑' if higher else '↓'})"
        for n in tokens:
            if "both" in modes and "none" in modes:
                t, b = by_mode["both"][n][metric], by_mode["none"][n][metric]
                c1 = claims[metric]["C1"]["comparisons"][str(n)]
                paper_rows.append({"metric": label, "tokens": n, "no text": b, "text (both)": t,
                                   "relative gain": f"{relative_gain(t, b, higher) * 100:+.1f}%",
                                   "text − no text [95%]": describe(c1),
                                   "text better": OUTCOME_WORDS[c1["outcome"]]})
            row = {"metric": label, "tokens": n}
            row.update({MODE_LABELS[m]: by_mode[m][n][metric] for m in ORDER_C3 if m in modes})
            row["best"] = MODE_LABELS[(max if higher else min)((m for m in modes), key=lambda m: by_mode[m][n][metric])]
            ablation_rows.append(row)
    reliance_rows = []
    for name, c in cells.items():
        wrong = c.get("metrics_wrong_caption")
        if not wrong:
            continue
        other, kind = c.get("metrics_other_caption"), c.get("other_caption_kind", "another class")
        for metric in primary:
            right, bad = scores[name][metric], wrong[metric]
            higher = higher_is_better(metric)
            row = {"cell": name, "metric": f"{metric} ({'↑' if higher else '↓'})", "right caption": right,
                   "next image's caption": bad,
                   "cost (next)": f"{relative_gain(right, bad, higher) * 100:+.1f}%"}
            if other and metric in other:
                row[f"caption of {kind}"] = other[metric]
                row[f"cost ({kind})"] = f"{relative_gain(right, other[metric], higher) * 100:+.1f}%"
            for swap, o in swaps.get(name, {}).get(metric, {}).items():
                row[f"right − {SWAPS[swap].replace('another class', kind)} [95%]"] = describe(o)
            reliance_rows.append(row)
    first = next(iter(cells.values()))["metrics"]
    base_dict = base.to_dict()
    per_cell = {name: {"model.num_tokens": c["tokens"], "model.text_in_encoder": c["text_in_encoder"],
                       "model.text_in_decoder": c["text_in_decoder"],
                       **({"init_from": c["train_config"]["init_from"]} if c["train_config"].get("init_from") else {})}
                for name, c in cells.items()}
    return {
        "recipe": recipe, "data": base.data.source, "tokens": tokens, "modes": modes, "seed": base.seed,
        "data_seed": base.data.seed, "max_steps": base.max_steps, "batch_size": base.batch_size,
        "model": base.model, "eval": eval_settings, "metrics": metrics, "primary_metrics": primary,
        "higher_is_better": {m: higher_is_better(m) for m in metrics},
        "paper_table": paper_rows, "ablation_table": ablation_rows, "claims": claims,
        "text_reliance_table": reliance_rows, "swap_costs": swaps,
        "noise": {"bootstrap_replicates": reps if noisy else 0, "level": LEVEL,
                  "seeds": sorted({len(v) for per_n in (seeds or {}).values() for per_m in per_n.values()
                                   for v in per_m.values()})},
        "verdicts": verdict_lines(claims, primary), "generation": "not run",
        "metric_notes": first.get("metric_notes", {}), "skipped": first.get("skipped", {}),
        "train_config": base_dict, "cell_overrides": per_cell,
        "cells": cells,
    }


def write_report(out: Path, result: dict[str, Any], finals: dict[str, Path], images, device: torch.device) -> None:
    """Into ``out``: the reconstruction grid of ``finals`` (text mode -> tokenizer) on ``images``, a plot per
    metric, ``results.json`` and ``report.md``."""
    out.mkdir(parents=True, exist_ok=True)
    grid(finals, images, out / "grid.png", device)
    plots(out, result)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out / "report.md", render_report(result))


def print_summary(result: dict[str, Any]) -> None:
    """The headline metrics' table and the verdicts, on the terminal."""
    print()
    print_table([{k: _fmt(v) for k, v in r.items()} for r in result["paper_table"] or result["ablation_table"]
                 if r["metric"].split(" (")[0] in result["primary_metrics"]])
    print()
    for line in result["verdicts"]:
        print(line)


def slug(metric: str) -> str:
    """A name safe in a file name (`FD-opennsfw@64` -> `FD-opennsfw_64`)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", metric)


def plots(out: Path, result: dict) -> None:
    for metric in result["metrics"]:
        series = {MODE_LABELS[m]: [(n, result["cells"][cell_name(n, m)]["metrics"][metric]) for n in result["tokens"]]
                  for m in ORDER_C3 if m in result["modes"]}
        higher = result["higher_is_better"][metric]
        line_plot(series, "tokens N", f"{metric} ({'higher' if higher else 'lower'} is better)",
                  out / f"plot_{slug(metric)}.png", logx=True, title=f"{metric} vs token count")


@torch.no_grad()
def grid(finals: dict[str, Path], val, path: Path, device: torch.device) -> None:
    """Originals and each mode's reconstructions at the smallest N, the first caption beside each row."""
    count = min(GRID_IMAGES, len(val))
    columns: dict[str, torch.Tensor] = {}
    captions: list[str] = []
    for mode, final in finals.items():
        model = load_tokenizer(final).to(device).eval()
        x, recon, caps, _ = next(iter(reconstruct_batches(model, val, num=count, batch_size=count, device=device)))
        if not columns:
            columns["original"], captions = x.cpu(), caps
        columns[MODE_LABELS[mode]] = recon.cpu()
    captioned_grid(columns, captions, path)


def _fmt(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else v


def render_report(result: dict) -> str:
    """``report.md`` from a ``results.json`` dict."""
    cfg = result["train_config"]
    n0 = result["tokens"][0]
    ev = result["eval"]
    lines = [
        "# textok study: what text buys a 1D image tokenizer", "",
        f"Data `{result['data']}`, recipe `{result['recipe']}`, model `{result['model']}` with N ∈ "
        f"{{{token_list(result['tokens'])}}} tokens and text modes {', '.join(result['modes'])}. Every cell: the same "
        f"{result['max_steps']} steps × {result['batch_size']} images, training seed {result['seed']} "
        f"(data seed {result['data_seed']}); one caption per image picked at random each step. Evaluated on "
        f"{ev['val_num']} held-out images (split `{ev['val_split']}`"
        + (f" of `{result['evaluated_on']}`, a set the cells were not trained or tuned on" if result.get("evaluated_on")
           else "") + "), each with its first caption."
        + (f" A second training stage: every cell starts from the same cell of "
           f"`{Path(cfg['init_from']).parents[2]}`." if cfg.get("init_from") else ""), "",
        "## Claims (verdicts computed from the numbers below)", "",
    ]
    noise = result.get("noise", {})
    if noise.get("bootstrap_replicates"):
        lines += [f"Each comparison has a {noise['level']:.0%} interval from {noise['bootstrap_replicates']} paired "
                  f"bootstrap resamplings of the evaluation images (the same resamplings for every cell; Fréchet "
                  f"distances over the first {min(FD_REPS, noise['bootstrap_replicates'])}); a claim that "
                  "rests on a comparison whose interval straddles zero is **undecided**."
                  + (" Training seeds: a comparison whose sign differs between the seeds of the replicate studies is "
                     "undecided too." if noise.get("seeds") else "")
                  + " The intervals hold the noise of the evaluation images, not of training.", ""]
    else:
        lines += ["No noise estimates (cells evaluated without per-image values, or --bootstrap 0): every verdict "
                  "is decided by the point values of one training run.", ""]
    lines += [f"- {v}" for v in result["verdicts"]]
    lines += ["", "Per metric:", ""]
    rows = []
    for metric in result["metrics"]:
        c = result["claims"][metric]
        rows.append({"metric": metric, **{cid: word(c[cid]) for cid in ("C1", "C2", "C3")},
                     "C3 holds at N": token_list(c["C3"].get("holds_at", [])) or "—"})
    lines += [markdown_table(rows), ""]
    if result["paper_table"]:
        lines += ["## No text vs text (encoder + decoder), the paper's comparison", "",
                  "Relative gain: how much better text is, as a fraction of the no-text value (positive = text "
                  "better).", "", markdown_table([{k: _fmt(v) for k, v in r.items()} for r in result["paper_table"]]), ""]
    lines += ["## Ablation: where the text goes", "",
              markdown_table([{k: _fmt(v) for k, v in r.items()} for r in result["ablation_table"]]), ""]
    if result.get("text_reliance_table"):
        lines += ["## Does the tokenizer use the text?", "",
                  "Each text cell scored on the same images with another image's caption instead of its own: the "
                  "next image's (in a set stored by class, mostly the same class), and one of another class (a "
                  "far, random image when the data has no classes). The cost is how much worse that is, as a "
                  "fraction of the score with the wrong caption (0% = the text is ignored).", "",
                  markdown_table([{k: _fmt(v) for k, v in r.items()} for r in result["text_reliance_table"]]), ""]
    lines += ["## Plots", ""]
    lines += [f"![{m} vs tokens](plot_{slug(m)}.png)" for m in result["metrics"]]
    lines += ["", f"## Reconstructions at N={n0}", "",
              f"![original | {' | '.join(MODE_LABELS[m] for m in GRID_ORDER if m in result['modes'])}](grid.png)", ""]
    gen = result.get("generation")
    if isinstance(gen, dict):
        lines += _generation_section(gen)
    secs = {name: c.get("train_seconds") for name, c in result["cells"].items()}
    lines += ["Training time per cell (s; blank = trained in an earlier run): "
              + ", ".join(f"{k} {v if v is not None else ''}" for k, v in secs.items()), ""]
    if result["metric_notes"]:
        lines += ["## Notes on the metrics", ""] + [f"- **{k}**: {v}" for k, v in result["metric_notes"].items()] + [""]
    if result["skipped"]:
        lines += ["Not computed:", ""] + [f"- **{k}**: {v}" for k, v in result["skipped"].items()] + [""]
    lines += ["## Exact configuration", "",
              f"Shared training config (cell `{next(iter(result['cells']))}`; every cell's full config is in "
              "`results.json` and `cells/<cell>/train_config.json`):", "", "```json",
              json.dumps(cfg, indent=2, default=str), "```", "",
              "Per cell, only these differ:", "",
              markdown_table([{"cell": k, **v} for k, v in result["cell_overrides"].items()]), "",
              f"Evaluation: `{json.dumps(ev, default=str)}`", ""]
    return "\n".join(lines)


def _generation_section(gen: dict[str, Any]) -> list[str]:
    s = gen["settings"]
    kind = "text-to-image" if gen["text_to_image"] else "class-conditional"
    rows = []
    for name, run in gen["runs"].items():
        row = {"tokenizer": f"{name} ({MODE_LABELS[run['mode']]})"}
        row.update({f"{run['metric']} samples, seed {sd}": _fmt(v) for sd, v in zip(s["seeds"], run["sample_fd"])})
        row[f"{run['metric']} mean"] = _fmt(sum(run["sample_fd"]) / len(run["sample_fd"]))
        row[f"{run['metric']} reconstructions"] = _fmt(run["recon_fd"])
        row["generator train s"] = run.get("train_seconds") or ""
        rows.append(row)
    return ["## Generation (C4)", "",
            f"The same {kind} DiT (recipe `{Path(gen['recipe']).name}`) trained on the tokens of the best text "
            f"tokenizer at N={gen['tokens']} (`{gen['text_mode']}`, by the first headline metric) and of the no-text "
            f"one; {s['samples']} samples per sampling seed, each conditioned on the {s['condition']} "
            f"({s['sampling_steps']} steps, guidance {s['cfg_scale']}), scored against the {s['reference']}. "
            "'reconstructions' = the tokenizer's own reconstructions of the same images, the floor for a generator "
            "over its tokens. Each generator is trained once: the seed spread measures sampling noise only.", "",
            markdown_table(rows), "", f"Verdict: **{gen['verdict']}** — {gen['detail']}", "",
            f"![reference row, then samples per tokenizer]({gen.get('grid', 'generation.png')})", ""]


__all__ = ["GRID_ORDER", "assemble", "grid", "plots", "print_summary", "render_report", "slug",
           "write_report"]
