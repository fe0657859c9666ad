"""``textok demo-imagefolder``: ImageFolder end to end on the CPU — a tiny product-quantized multi-scale
tokenizer (32 px, P = 2 branches, scales 1,2,3,4), then its folded VAR, then samples per class — in a few
minutes on two cores.

1. Train the tokenizer with the recipe ``configs/demo-imagefolder.yaml`` (the other demos' data and held-out
   scenes), evaluate it on the 200 held-out scenes (PSNR / SSIM / FD-opennsfw@64, as ``make demo`` and
   ``make demo-titok`` do) and count the code usage of every branch and scale on them.
2. Decode the held-out scenes from every prefix of the scales (``reconstructions.png``: original, then 1, 2, ...
   S scales).
3. Extract the codes of the training scenes (and of the held-out ones), train a class-conditional folded VAR on
   them, measure its teacher-forced token loss on the held-out codes (true class and null class), and sample a
   grid with one row per class.
4. Put ImageFolder beside TexTok, the no-text baseline and TiTok when ``runs/demo/metrics.json`` /
   ``runs/demo-titok/metrics.json`` exist and were evaluated on the same held-out scenes.

Writes ``OUT/imagefolder/`` and ``OUT/var/`` (resumable runs), ``OUT/latents/``, ``OUT/val-latents/``,
``OUT/reconstructions.png``, ``OUT/samples.png``, ``OUT/metrics.json`` and ``OUT/report.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ...data.factory import build_dataset
from ...data.folder import collate
from ...data.images import save_image
from ...errors import TextokError
from ...eval.compare import higher_is_better
from ...eval.image_metrics import psnr
from ...eval.reconstruction import evaluate_tokenizer
from ...generate.latents import LatentDataset, read_meta
from ...generate.sampling import GenerationPipeline, sample_grid
from ...io import atomic_write_text
from ...models.registry import generator_kind, load_generator, load_tokenizer
from ...report import markdown_table, print_table
from ...train.config import load_generator_config, load_train_config
from ...train.generator import frozen_quantizer, train_generator
from ...train.tokenizer import train_tokenizer
from .titok import _codes, _metric_keys, _require_finished, _tail_mean

RECIPE = "demo-imagefolder"
# The VAR: width 128, depth 4 (var-s-32's size) over the 30 positions of scales 1,2,3,4; label drop 0.1 for CFG.
GENERATOR = {"batch_size": 64, "optim.lr": 1e-3, "optim.warmup_steps": 100, "ema_decay": 0.995, "log_every": 50,
             "ckpt_every": 500, "max_steps": 1000}
QUICK_TOK = {"max_steps": 3, "data.train_size": 64, "data.val_size": 16, "batch_size": 8, "log_every": 1,
             "ckpt_every": 3, "optim.warmup_steps": 1, "model.quantizer.num_codes": 32, "loss.perceptual_size": 32}
QUICK_GEN = {"model.width": 32, "model.depth": 1, "model.heads": 2, "batch_size": 8, "max_steps": 3, "ckpt_every": 3,
             "optim.warmup_steps": 1, "log_every": 1}
OTHERS = {"runs/demo": ("TexTok", "baseline (no text)"), "runs/demo-titok": ("TiTok",)}


def run_demo_imagefolder(out: str | Path = "runs/demo-imagefolder", steps: int | None = None,
                         gen_steps: int | None = None, quick: bool = False, compare: bool = True,
                         per_class: int = 8, recipe: str = RECIPE) -> dict[str, Any]:
    """Train (or resume) ImageFolder then its VAR under ``out``, evaluate, sample; returns what metrics.json holds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    # ---- 1. the tokenizer and its reconstructions --------------------------------------------------
    cfg = load_train_config(recipe, {**(QUICK_TOK if quick else {}), **({"max_steps": steps} if steps else {})})
    print(f"== training ImageFolder ({cfg.model} + {len(cfg.model_overrides)} overrides): {cfg.max_steps} steps of "
          f"{cfg.batch_size} images ==")
    t0 = time.time()
    tok_dir = train_tokenizer(cfg, out / "imagefolder", progress=not quick)
    seconds["tokenizer_train"] = round(time.time() - t0, 1)
    _require_finished(tok_dir, cfg.max_steps, "ImageFolder")
    tok = load_tokenizer(tok_dir).eval()
    if tok.code_form != "scales":
        raise TextokError(f"recipe {recipe!r} trains a {tok.model_type}; demo-imagefolder needs an ImageFolder")

    t0 = time.time()
    d = cfg.data
    val = build_dataset(d.source, d.val_split, tok.config.image_size, size=d.val_size, seed=d.seed)
    print(f"evaluating ImageFolder on {len(val)} held-out scenes")
    recon = evaluate_tokenizer(tok, val, num=len(val), batch_size=64, fd_size=cfg.loss.perceptual_size,
                               progress=False)
    prefixes = prefix_grid(tok, val, out / "reconstructions.png")
    seconds["tokenizer_eval"] = round(time.time() - t0, 1)

    # ---- 2. codes, VAR, samples ----------------------------------------------------------------------
    t0 = time.time()
    lat_dir = _codes(tok_dir, out / "latents", "train", 64 if quick else 0, d.seed, quick, stale=[out / "var"])
    val_dir = _codes(tok_dir, out / "val-latents", d.val_split, d.val_size, d.seed, quick)
    seconds["extract_codes"] = round(time.time() - t0, 1)
    usage = usage_per_scale(val_dir)

    gcfg = load_generator_config("var-s-32", {"latents": str(lat_dir), **GENERATOR, **(QUICK_GEN if quick else {}),
                                              **({"max_steps": gen_steps} if gen_steps else {})})
    meta = read_meta(lat_dir)
    print(f"\n== training a folded VAR on {meta['count']} x {tuple(meta['code_shape'])} codes: {gcfg.max_steps} steps "
          f"of {gcfg.batch_size} ==")
    t0 = time.time()
    gen_dir = train_generator(gcfg, out / "var", progress=not quick)
    seconds["var_train"] = round(time.time() - t0, 1)
    _require_finished(gen_dir, gcfg.max_steps, "VAR")
    gen_train = _tail_mean(out / "var" / "log.jsonl", ("loss", "accuracy"))
    gen_val = heldout_var_loss(gen_dir, val_dir)

    t0 = time.time()
    pipe = GenerationPipeline(gen_dir, tok_dir, device="cpu")
    classes = list(range(pipe.num_classes))
    n = 2 if quick else per_class
    samples = sample_grid(pipe, out / "samples.png", classes, n=n, cfg_scale=pipe.default_cfg(), seed=0)
    seconds["sampling"] = round(time.time() - t0, 1)
    names = meta.get("class_names") or [str(k) for k in classes]

    # ---- 3. metrics, comparison, report --------------------------------------------------------------
    tc = tok.config
    q = tc.quantizer
    budget = (f"{tc.codes_per_image} code ids x log2({q.num_codes}) = {tc.codes_per_image * math.log2(q.num_codes):g} "
              f"bits ({q.branches} branches x {q.codes_per_branch} codes; the folded VAR predicts them in "
              f"{q.codes_per_branch} positions)")
    result: dict[str, Any] = {
        "recipe": recipe, "train_config": cfg.to_dict(), "tokenizer_config": tc.to_dict(), "val_images": len(val),
        "imagefolder": recon, "prefix_psnr": prefixes, "usage_per_scale": usage, "token_budget": budget,
        "var": {"config": gcfg.to_dict(), "model_config": pipe.model.config.to_dict(), "train_last_logs": gen_train,
                "heldout": gen_val, "train_scenes": meta["count"]},
        "samples": str(samples), "rows": {k: names[k] for k in classes}, "seconds": seconds,
    }
    result["comparison"] = comparison(result, cfg) if compare else {"note": "no comparison requested"}
    rows = result["comparison"].get("table") or [
        {"metric": k, "ImageFolder": f"{recon[k]:.4f}"} for k in _metric_keys(recon)]
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out / "report.md", _report(result, cfg, gcfg))
    print()
    print_table(rows)
    if result["comparison"].get("note"):
        print(f"note: {result['comparison']['note']}")
    print("PSNR by scale prefix: " + ", ".join(f"{k} {v:.2f}" for k, v in prefixes.items()))
    print(f"VAR held-out token loss {gen_val['loss']:.3f} (null class {gen_val['loss_unconditional']:.3f}, chance "
          f"{gen_val['chance_loss']:.3f}); {sum(seconds.values()):.0f} s in all")
    print(f"wrote {out / 'reconstructions.png'}, {samples}, {out / 'metrics.json'}, {out / 'report.md'}")
    return result


# ---- pieces -------------------------------------------------------------------------------------------
@torch.no_grad()
def prefix_grid(tok: Any, dataset: Any, path: Path, count: int = 8) -> dict[str, float]:
    """Rows: held-out scenes; columns: the original, then the decoding of the first 1, 2, ..., S scales. Returns
    the PSNR of each prefix over those rows (it must rise towards the full reconstruction)."""
    batch = collate([dataset[i] for i in range(min(count, len(dataset)))])
    x = batch["image"]
    codes = tok.encode_codes(x)
    S = len(tok.scales)
    cols = [x] + [tok.decode_codes(codes, num_scales=n).clamp(-1, 1) for n in range(1, S + 1)]
    save_image(torch.stack(cols, dim=1).flatten(0, 1), str(path), nrow=S + 1)
    return {f"{n} scale{'s' if n > 1 else ''} (up to {tok.scales[n - 1]}x{tok.scales[n - 1]})": float(psnr(rec, x).mean())
            for n, rec in enumerate(cols[1:], start=1)}


def usage_per_scale(lat_dir: Path) -> dict[str, Any]:
    """Distinct codes of each branch at each scale over a latents directory's images, as a fraction of the
    codebook (what the tokenizer's ``metric/usage_b{p}_s{s}`` logs per batch); and over all scales."""
    meta = read_meta(lat_dir)
    lay = meta["code_layout"]
    codes = LatentDataset(lat_dir, normalize=False).codes  # (M, P, L)
    V, rows, start = lay["codebook_size"], [], 0
    for pn in lay["scales"]:
        part = codes[:, :, start:start + pn * pn]
        rows.append([int(part[:, p].unique().numel()) / V for p in range(lay["branches"])])
        start += pn * pn
    overall = [int(codes[:, p].unique().numel()) / V for p in range(lay["branches"])]
    return {"scales": lay["scales"], "per_scale": rows, "all_scales": overall, "codebook_size": V,
            "images": int(codes.shape[0])}


@torch.no_grad()
def heldout_var_loss(gen_dir: Path, val_dir: Path) -> dict[str, Any]:
    """The VAR's teacher-forced cross-entropy (mean of the branches) and accuracy on held-out codes, with the true
    class and with the null class; the gap is how much the class tells the generator about the codes."""
    model, record = load_generator(gen_dir)
    model.eval()
    data = LatentDataset(val_dir, normalize=False)
    inputs = frozen_quantizer(read_meta(val_dir), val_dir).teacher_forcing_inputs(data.codes)
    labels = data.labels.clamp_min(0)
    no_drop = torch.zeros_like(labels, dtype=torch.bool)
    cond = model.training_loss(data.codes, inputs, labels, drop=no_drop)
    null = model.training_loss(data.codes, inputs, torch.full_like(labels, model.null_class), drop=no_drop)
    return {"loss": float(cond["loss"]), "accuracy": float(cond["accuracy"]),
            "ce_per_branch": [float(v) for v in cond["ce_per_branch"]],
            "loss_unconditional": float(null["loss"]), "accuracy_unconditional": float(null["accuracy"]),
            "class_gain_nats": float(null["loss"] - cond["loss"]), "images": int(data.codes.shape[0]),
            "chance_loss": math.log(model.config.codebook_size)}


def comparison(result: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """ImageFolder beside the demos whose metrics.json exists and was evaluated on the same held-out scenes."""
    d = cfg.data
    ours = (d.source, d.val_split, d.val_size, d.seed, result["val_images"])
    columns: dict[str, dict[str, float]] = {}
    notes = []
    for where, names in OTHERS.items():
        path = Path(where) / "metrics.json"
        if not path.is_file():
            notes.append(f"no {path}")
            continue
        other = json.loads(path.read_text())
        od = other.get("train_config", {}).get("data", {})
        theirs = (od.get("source"), od.get("val_split"), od.get("val_size"), od.get("seed"), other.get("val_images"))
        if theirs != ours:
            notes.append(f"{path} was evaluated on other held-out scenes ({theirs} vs ours {ours})")
            continue
        metrics = other.get("metrics") or {}
        found = {"TexTok": metrics.get("textok"), "baseline (no text)": metrics.get("baseline"),
                 "TiTok": other.get("titok")}
        columns.update({name: found[name] for name in names if isinstance(found.get(name), dict)})
    if not columns:
        return {"note": "; ".join(notes) + ": no comparison (run `make demo` / `make demo-titok` for one)"}
    columns["ImageFolder"] = result["imagefolder"]
    rows = []
    for k in _metric_keys(result["imagefolder"]):
        vals = {name: m[k] for name, m in columns.items() if isinstance(m.get(k), (int, float))}
        best = (max if higher_is_better(k) else min)(vals, key=vals.get)
        rows.append({"metric": k + (" (higher is better)" if higher_is_better(k) else " (lower is better)"),
                     **{name: f"{v:.4f}" for name, v in vals.items()}, "best": best})
    return {"table": rows, "note": "; ".join(notes) if notes else "", "sources": list(OTHERS)}


def _report(result: dict, cfg: Any, gcfg: Any) -> str:
    tc, gen, us = result["tokenizer_config"], result["var"], result["usage_per_scale"]
    q, gm, held = tc["quantizer"], gen["model_config"], gen["heldout"]
    comp = result["comparison"]
    lines = ["# textok demo-imagefolder: ImageFolder (product-quantized multi-scale tokens) + a folded VAR", "",
             f"ImageFolder: {tc['image_size']} px, patch {tc['patch_size']}, ViT width {tc['encoder']['width']} depth "
             f"{tc['encoder']['depth']} (encoder and decoder, trained from scratch), {q['branches']} branches of "
             f"{q['num_codes']} codes x {q['code_dim']} channels on a {tc['latent_grid']}x{tc['latent_grid']} grid, "
             f"scales {q['scales']}, quantizer dropout {q['dropout']}, semantic teacher {tc['semantic_teacher']}; "
             f"no text. Token budget: {result['token_budget']}. Trained {cfg.max_steps} steps x {cfg.batch_size} "
             f"images (l2 + VQ terms) on {cfg.data.train_size} scenes; evaluated on {result['val_images']} held-out "
             "scenes.", ""]
    if comp.get("table"):
        lines += ["## Beside TexTok and TiTok (same held-out scenes)", "", markdown_table(comp["table"]), "",
                  "Token budgets differ (TexTok: continuous tokens; TiTok: 8 codes; ImageFolder: the budget above)."
                  + (f" {comp['note']}." if comp.get("note") else ""), ""]
    else:
        lines += ["## Reconstruction", "", markdown_table(
            [{"metric": k, "ImageFolder": f"{result['imagefolder'][k]:.4f}"} for k in _metric_keys(result["imagefolder"])]),
            "", f"No comparison: {comp.get('note', '')}", ""]
    lines += ["## Reconstruction from a prefix of the scales", "",
              markdown_table([{"scales decoded": k, "PSNR (dB, 8 scenes)": f"{v:.2f}"}
                              for k, v in result["prefix_psnr"].items()]), "",
              "![original, then 1, 2, ... scales](reconstructions.png)", "",
              "## Code usage per branch and scale (held-out scenes)", "",
              f"Fraction of each branch's {us['codebook_size']} codes that appear at that scale over the "
              f"{us['images']} held-out images (a 1x1 scale can use at most {us['images']} codes):", "",
              markdown_table([{"scale": f"{pn}x{pn}", **{f"branch {p}": f"{u:.3f}" for p, u in enumerate(row)}}
                              for pn, row in zip(us["scales"], us["per_scale"])]
                             + [{"scale": "all", **{f"branch {p}": f"{u:.3f}" for p, u in enumerate(us["all_scales"])}}]),
              "", "## The folded VAR", "",
              f"Class-conditional ({len(result['rows'])} classes = the main object's shape), width {gm['width']} "
              f"depth {gm['depth']}, fold={gm['fold']}, trained {gcfg.max_steps} steps x {gcfg.batch_size} on the "
              f"codes of {gen['train_scenes']} training scenes. Teacher-forced cross-entropy per code id (chance: "
              f"ln V = {held['chance_loss']:.2f}):", "",
              markdown_table([
                  {"set": "training batches (mean of the last logs)", "loss": gen["train_last_logs"].get("loss", float("nan")),
                   "accuracy": gen["train_last_logs"].get("accuracy", float("nan"))},
                  {"set": f"held-out scenes ({held['images']})", "loss": held["loss"], "accuracy": held["accuracy"]},
                  {"set": "held-out scenes, null class", "loss": held["loss_unconditional"],
                   "accuracy": held["accuracy_unconditional"]}]), "",
              f"Null class minus true class: {held['class_gain_nats']:+.3f} nats per code id.", "",
              f"Samples, one row per class ({', '.join(result['rows'].values())}), guidance w = {generator_kind('var').default_cfg} "
              "at the last scale (the paper's cfg 3.25), top-k 750, top-p 0.95:", "", "![samples](samples.png)", "",
              "## Time", "", f"Wall seconds of this invocation (a resumed run skips training): "
              f"{sum(result['seconds'].values()):.1f} in all, "
              + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()) + ".", ""]
    notes = result["imagefolder"].get("metric_notes") or {}
    if notes:
        lines += ["Notes on the metrics:", ""] + [f"- **{k}**: {v}" for k, v in notes.items()] + [""]
    return "\n".join(lines)
