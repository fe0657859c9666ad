"""``textok demo-titok``: the TiTok baseline end to end on the CPU — a small 1D VQ tokenizer, then a MaskGIT
over its codes, then samples per class — in a few minutes on two cores.

1. Train a small TiTok (VQ, no text) on the embedded captioned scenes with the recipe ``configs/demo-titok.yaml``
   (the same data sizes and held-out scenes as ``make demo``), and evaluate it on the held-out scenes with
   :func:`~textok.eval.reconstruction.evaluate_tokenizer` plus the codebook usage of the held-out codes.
2. Extract the codes of the training scenes, train a class-conditional MaskGIT on them (class = the shape of
   the main object, 8 classes), and sample a grid with one row per class.
3. If ``runs/demo/metrics.json`` (from ``make demo``) exists and was evaluated on the same held-out scenes,
   compare TexTok, the no-text TexTok baseline and TiTok in one table (their token budgets differ, which the
   table states).

Writes::

    OUT/titok/            the tokenizer run (resumable; final/ = EMA weights; log.jsonl has metric/perplexity ...)
    OUT/latents/          codes of the training scenes (re-extracted only when the tokenizer changed)
    OUT/val-latents/      codes of the held-out scenes (for the MaskGIT's held-out loss)
    OUT/maskgit/          the generator run (resumable; final/ = EMA weights)
    OUT/samples.png       one row per class of MaskGIT samples
    OUT/reference.png     one row per class of the tokenizer's reconstructions of real training scenes
    OUT/metrics.json, OUT/report.md

Re-running skips finished training (both runs resume from their last checkpoint) and only re-evaluates.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...data.factory import build_dataset
from ...errors import TextokError
from ...eval.compare import higher_is_better
from ...eval.reconstruction import evaluate_tokenizer
from ...generate.latents import LatentDataset, extract_latents, read_meta
from ...generate.sampling import GenerationPipeline, sample_grid
from ...io import RUN_MARKER, atomic_write_text, check_replaceable, sha256_file
from ...models.registry import load_generator, load_tokenizer, resolve_tokenizer_config
from ...report import markdown_table, print_table
from ...train.config import load_generator_config, load_train_config
from ...train.generator import train_generator
from ...train.tokenizer import train_tokenizer
from .generation import reference_grid

RECIPE = "demo-titok"
# MaskGIT: maskgit-tiny's shape (width 64, depth 2, 4 heads) on the codes of the whole train split (4,000 scenes,
# of which the tokenizer saw the first 2,000). Measured on the held-out codes: the generator is data-bound here
# (width 128 / depth 3 overfits 2,000 scenes: held-out loss 4.77 vs 4.43 with 4,000; on 4,000 it matches
# width 64 / depth 2 at 2.6x the time), so the small one with a wide batch is the better use of the CPU.
GENERATOR = {"batch_size": 128, "optim.lr": 1e-3, "optim.warmup_steps": 100, "optim.weight_decay": 0.01,
             "ema_decay": 0.995, "log_every": 50, "ckpt_every": 500, "max_steps": 2000}
GEN_SCENES = 0  # 0 = the whole train split
# a minimal pipeline run, for tests
QUICK_TOK = {"max_steps": 3, "data.train_size": 64, "data.val_size": 16, "batch_size": 8, "log_every": 1,
             "ckpt_every": 3, "optim.warmup_steps": 1, "model.num_tokens": 4, "model.quantizer.num_codes": 32,
             "model.encoder.width": 32, "model.decoder.width": 32, "model.encoder.heads": 2, "model.decoder.heads": 2,
             "loss.perceptual_size": 32}
QUICK_GEN = {"model.transformer.width": 32, "model.transformer.depth": 1, "model.transformer.heads": 2,
             "batch_size": 8, "max_steps": 3, "ckpt_every": 3, "optim.warmup_steps": 1, "log_every": 1}


def run_demo_titok(out: str | Path = "runs/demo-titok", steps: int | None = None, gen_steps: int | None = None,
                   quick: bool = False, compare: str | Path | None = "runs/demo", per_class: int = 8,
                   recipe: str = RECIPE) -> dict[str, Any]:
    """Train (or resume) TiTok then MaskGIT under ``out``, sample, evaluate; returns what metrics.json holds.

    ``steps`` / ``gen_steps`` override the tokenizer's / generator's training steps; ``compare`` is a
    ``textok demo`` output directory whose metrics.json joins the comparison table (None: no comparison).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    # ---- 1. the tokenizer ------------------------------------------------------------------------
    overrides = {**(QUICK_TOK if quick else {}), **({"max_steps": steps} if steps is not None else {})}
    cfg = load_train_config(recipe, overrides)
    print(f"== training TiTok ({cfg.model} + {len(cfg.model_overrides)} overrides): {cfg.max_steps} steps of "
          f"{cfg.batch_size} images ==")
    t0 = time.time()
    tok_dir = train_tokenizer(cfg, out / "titok", progress=not quick)
    seconds["titok_train"] = round(time.time() - t0, 1)
    _require_finished(tok_dir, cfg.max_steps, "TiTok")
    tok = load_tokenizer(tok_dir).eval()
    if tok.code_form != "codes":
        raise TextokError(f"recipe {recipe!r} trains a {tok.model_type} without discrete codes; demo-titok needs "
                          "a TiTok with quantizer.kind=vq")

    t0 = time.time()
    d = cfg.data
    val = build_dataset(d.source, d.val_split, tok.config.image_size, size=d.val_size, seed=d.seed)
    print(f"evaluating TiTok on {len(val)} held-out scenes")
    recon = evaluate_tokenizer(tok, val, num=len(val), batch_size=64, fd_size=cfg.loss.perceptual_size,
                               progress=False)
    seconds["titok_eval"] = round(time.time() - t0, 1)

    # ---- 2. codes, MaskGIT, samples --------------------------------------------------------------
    t0 = time.time()
    num_train = 64 if quick else GEN_SCENES
    lat_dir = _codes(tok_dir, out / "latents", "train", num_train, d.seed, quick, stale=[out / "maskgit"])
    val_dir = _codes(tok_dir, out / "val-latents", d.val_split, d.val_size, d.seed, quick)
    seconds["extract_codes"] = round(time.time() - t0, 1)
    codebook = _codebook_stats(val_dir, tok.codebook_size)
    train_log = _last_log(out / "titok" / "log.jsonl")

    gen_over = {"latents": str(lat_dir), **GENERATOR, **(QUICK_GEN if quick else {}),
                **({"max_steps": gen_steps} if gen_steps is not None else {})}
    gcfg = load_generator_config("maskgit-tiny", gen_over)
    meta = read_meta(lat_dir)
    print(f"\n== training a MaskGIT on {meta['count']} x {meta['num_tokens']} codes ({meta['codebook_size']}-entry "
          f"codebook, {meta['num_classes']} classes): {gcfg.max_steps} steps of {gcfg.batch_size} ==")
    t0 = time.time()
    gen_dir = train_generator(gcfg, out / "maskgit", progress=not quick)
    seconds["maskgit_train"] = round(time.time() - t0, 1)
    _require_finished(gen_dir, gcfg.max_steps, "MaskGIT")
    gen_train = _tail_mean(out / "maskgit" / "log.jsonl", ("loss", "accuracy"))
    gen_val = _heldout_maskgit(gen_dir, val_dir)

    t0 = time.time()
    pipe = GenerationPipeline(gen_dir, tok_dir, device="cpu")
    classes = list(range(pipe.num_classes))
    n = 2 if quick else per_class
    samples = sample_grid(pipe, out / "samples.png", classes, n=n, steps=8, cfg_scale=pipe.default_cfg(), seed=0)
    reference = reference_grid(pipe, lat_dir, classes, n, out / "reference.png")
    seconds["sampling"] = round(time.time() - t0, 1)
    names = meta.get("class_names") or [str(k) for k in classes]

    # ---- 3. metrics, comparison, report ----------------------------------------------------------
    tcfg = tok.config
    bits = math.log2(tcfg.quantizer.num_codes)
    budget = {"num_tokens": tcfg.num_tokens, "codebook_size": tcfg.quantizer.num_codes,
              "bits": tcfg.num_tokens * bits,
              "text": f"{tcfg.num_tokens} codes x log2({tcfg.quantizer.num_codes}) = {tcfg.num_tokens * bits:g} bits"}
    throughput = _throughput(out / "titok" / "log.jsonl", cfg.batch_size, out / "maskgit" / "log.jsonl",
                             gcfg.batch_size)
    result: dict[str, Any] = {
        "recipe": recipe, "train_config": cfg.to_dict(), "tokenizer_config": tcfg.to_dict(), "val_images": len(val),
        "titok": recon, "codebook": {**codebook, "train_log": train_log}, "token_budget": budget,
        "maskgit": {"config": gcfg.to_dict(), "model_config": pipe.model.config.to_dict(), "train_last_logs": gen_train,
                    "heldout": gen_val, "train_scenes": meta["count"]},
        "samples": str(samples), "reference": str(reference), "rows": {k: names[k] for k in classes},
        "seconds": seconds, "throughput": throughput,
    }
    result["comparison"] = _comparison(compare, result, cfg) if compare else {"note": "no comparison requested"}
    rows = result["comparison"].get("table") or _titok_rows(result)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out / "report.md", _report(result, cfg, gcfg))
    print()
    print_table(rows)
    if result["comparison"].get("note"):
        print(f"note: {result['comparison']['note']}")
    print(f"codebook: {codebook['used']}/{codebook['size']} codes used on the held-out scenes "
          f"(perplexity {codebook['perplexity']:.1f}); MaskGIT held-out masked-token loss {gen_val['loss']:.3f}, "
          f"accuracy {gen_val['accuracy']:.3f}; null class minus true class: {gen_val['class_gain_nats']:+.3f} nats")
    print(f"samples (one row per class: {', '.join(names[k] for k in classes)}): {samples}")
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}")
    return result


# ---- pieces ----------------------------------------------------------------------------------------
def _require_finished(final: Path, steps: int, what: str) -> None:
    """Stop (resumably) when a training stage was interrupted: its final/ is missing or from fewer steps."""
    path = final / "config.json"
    done = json.loads(path.read_text()).get("train_step") if path.is_file() else None
    if done != steps:
        raise TextokError(f"{what} training stopped before step {steps} (its final weights are "
                          f"{'missing' if done is None else f'from step {done}'}); run the same command again "
                          "to resume")


def _codes(tok_dir: Path, lat_dir: Path, split: str, num: int, seed: int, quiet: bool,
           stale: list[Path] = ()) -> Path:
    """Extract ``split``'s codes into ``lat_dir`` unless they were made by these exact tokenizer weights.

    A re-extraction makes every directory in ``stale`` (a generator trained on the old codes) obsolete: they
    are removed, so that a resumed generator never mixes two tokenizers' codes.
    """
    weights = sha256_file(tok_dir / "model.safetensors")
    stamp = lat_dir / "tokenizer.sha256"
    if (lat_dir / "meta.json").is_file() and stamp.is_file() and stamp.read_text().strip() == weights:
        meta = read_meta(lat_dir)
        if meta["dataset"]["num"] == num and meta["dataset"]["split"] == split and meta["dataset"]["seed"] == seed:
            return lat_dir
    for path in stale:
        if path.exists():
            check_replaceable(path, (RUN_MARKER,), what="generator run")  # only a run textok made is removed
            print(f"the tokenizer changed: removing {path}, which was trained on the old codes")
            shutil.rmtree(path)
    print(f"== extracting the codes of the scenes ({split}) ==")
    extract_latents(tok_dir, "scenes", lat_dir, split=split, num=num, batch_size=64, seed=seed, device="cpu",
                    progress=not quiet)
    atomic_write_text(stamp, weights + "\n")
    return lat_dir


def _codebook_stats(lat_dir: Path, size: int) -> dict[str, Any]:
    """How much of the codebook the held-out scenes use: distinct codes, their fraction, the perplexity."""
    codes = LatentDataset(lat_dir, normalize=False).codes.flatten()
    counts = torch.bincount(codes, minlength=size).double()
    p = counts[counts > 0] / counts.sum()
    return {"size": size, "used": int((counts > 0).sum()), "usage": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(-(p * p.log()).sum())), "tokens": int(codes.numel()),
            "most_common_share": float(counts.max() / counts.sum())}


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_log(path: Path) -> dict[str, float]:
    """The last training-log entry's l2 and ``metric/...`` values (codebook usage/perplexity per batch)."""
    logs = _read_log(path)
    if not logs:
        return {}
    last = logs[-1]
    return {k: v for k, v in last.items() if k == "step" or k == "l2" or k.startswith("metric/")}


def _tail_mean(path: Path, keys: tuple[str, ...], frac: float = 0.1) -> dict[str, float]:
    """Mean of ``keys`` over the last ``frac`` of the log entries (one batch each, so a short mean steadies them)."""
    logs = _read_log(path)
    if not logs:
        return {}
    tail = logs[-max(1, int(len(logs) * frac)):]
    result = {k: sum(e[k] for e in tail) / len(tail) for k in keys if all(k in e for e in tail)}
    result["steps"] = [tail[0]["step"], tail[-1]["step"]]
    return result


@torch.no_grad()
def _heldout_maskgit(gen_dir: Path, val_dir: Path, draws: int = 8) -> dict[str, float]:
    """The MaskGIT's masked-token cross-entropy/accuracy on the held-out scenes' codes, averaged over ``draws``
    seeded mask draws: with the true class, and with the null class on the same masks. The gap is how much the
    class tells the generator about the codes (0 = the rows of the sample grid cannot differ by class)."""
    model, _ = load_generator(gen_dir)
    model.eval()
    data = LatentDataset(val_dir, normalize=False)
    codes, labels = data.codes, data.labels.clamp_min(0)
    null = torch.full_like(labels, model.null_class)
    sums = {"loss": 0.0, "accuracy": 0.0, "loss_unconditional": 0.0, "accuracy_unconditional": 0.0}
    for k in range(draws):
        inputs, mask, _ = model.mask_tokens(codes, torch.Generator().manual_seed(1000 + k))
        w = mask.float() / mask.sum().clamp_min(1)
        for suffix, y in (("", labels), ("_unconditional", null)):
            logits = model(inputs, y).float()
            ce = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")
            sums["loss" + suffix] += float((ce * w).sum()) / draws
            sums["accuracy" + suffix] += float(((logits.argmax(-1) == codes).float() * w).sum()) / draws
    return {**sums, "class_gain_nats": sums["loss_unconditional"] - sums["loss"], "images": int(codes.shape[0]),
            "mask_draws": draws, "chance_loss": math.log(model.config.codebook_size)}


def _throughput(tok_log: Path, tok_batch: int, gen_log: Path, gen_batch: int) -> dict[str, float]:
    """Median training steps/s from the logs (measured while training, so also valid after a resume)."""
    def median_rate(path: Path, key: str, batch: int) -> float:
        rates = sorted(e[key] / batch for e in _read_log(path)[1:] if key in e)  # the first interval warms up
        return float(rates[len(rates) // 2]) if rates else float("nan")

    return {"titok_steps_per_s": median_rate(tok_log, "images_per_s", tok_batch),
            "maskgit_steps_per_s": median_rate(gen_log, "samples_per_s", gen_batch)}


def _metric_keys(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_images"]


def _titok_rows(result: dict) -> list[dict]:
    rows = [{"metric": k + (" (higher is better)" if higher_is_better(k) else " (lower is better)"),
             "TiTok": f"{result['titok'][k]:.4f}"} for k in _metric_keys(result["titok"])]
    rows.append({"metric": "token budget", "TiTok": result["token_budget"]["text"]})
    return rows


def _comparison(demo_dir: str | Path, result: dict, cfg) -> dict[str, Any]:
    """TexTok | baseline | TiTok on the same held-out scenes, from ``demo_dir/metrics.json`` (``textok demo``)."""
    path = Path(demo_dir) / "metrics.json"
    if not path.is_file():
        return {"note": f"no {path}: run `make demo` (textok demo) for the TexTok comparison"}
    demo = json.loads(path.read_text())
    dd, td = demo.get("train_config", {}).get("data", {}), cfg.data
    ours = (td.source, td.val_split, td.val_size, td.seed, result["tokenizer_config"]["image_size"])
    demo_size = _demo_image_size(demo_dir, demo)
    theirs = (dd.get("source"), dd.get("val_split"), dd.get("val_size"), dd.get("seed"), demo_size)
    if ours != theirs or demo.get("val_images") != result["val_images"]:
        return {"note": f"{path} was evaluated on other held-out scenes (source, split, size, seed, image size "
                        f"{theirs}, {demo.get('val_images')} images vs ours {ours}, {result['val_images']}): "
                        "no comparison; re-run both with the same data settings"}
    metrics = demo.get("metrics") or {}
    names = [k for k in _metric_keys(result["titok"]) if all(k in metrics.get(m, {}) for m in ("baseline", "textok"))]
    if not names:
        return {"note": f"{path} has no baseline/textok metrics in common with TiTok's: no comparison"}
    rows = []
    for k in names:
        vals = {"TexTok": metrics["textok"][k], "baseline (no text)": metrics["baseline"][k],
                "TiTok": result["titok"][k]}
        best = (max if higher_is_better(k) else min)(vals, key=vals.get)
        rows.append({"metric": k + (" (higher is better)" if higher_is_better(k) else " (lower is better)"),
                     **{name: f"{v:.4f}" for name, v in vals.items()}, "best": best})
    tex = _demo_budget(demo_dir, demo)
    rows.append({"metric": "token budget", "TexTok": tex, "baseline (no text)": tex,
                 "TiTok": result["token_budget"]["text"], "best": ""})
    same = tex.split(" ")[0] == str(result["token_budget"]["num_tokens"])
    note = ("token budgets differ: TexTok and its baseline keep N continuous tokens of 8 float channels, TiTok N "
            "integer codes of log2(K) bits each" + ("" if same else "; the token counts differ too"))
    return {"source": str(path), "table": rows, "note": note,
            "train_steps": {"textok demo": demo.get("train_config", {}).get("max_steps"),
                            "TiTok": cfg.max_steps}}


def _demo_model_config(demo_dir: str | Path, demo: dict) -> dict | None:
    cfg_path = Path(demo_dir) / "textok" / "final" / "config.json"
    if cfg_path.is_file():
        data = json.loads(cfg_path.read_text())
        return data.get("config", data)
    tc = demo.get("train_config", {})
    try:
        return resolve_tokenizer_config(tc["model"], tc.get("model_overrides", ()))[1].to_dict()
    except Exception:  # an old or foreign metrics.json: the budget is then unknown
        return None


def _demo_image_size(demo_dir: str | Path, demo: dict) -> int | None:
    mc = _demo_model_config(demo_dir, demo)
    return None if mc is None else mc.get("image_size")


def _demo_budget(demo_dir: str | Path, demo: dict) -> str:
    mc = _demo_model_config(demo_dir, demo)
    if mc is None:
        return "unknown"
    n, c = mc.get("num_tokens"), mc.get("token_channels", 8)
    return f"{n} tokens x {c} float channels"


def _report(result: dict, cfg, gcfg) -> str:
    cb, gen, tc = result["codebook"], result["maskgit"], result["tokenizer_config"]
    gm = gen["model_config"]
    q = tc["quantizer"]
    comp = result["comparison"]
    lines = ["# textok demo-titok: the TiTok baseline (1D VQ tokenizer + MaskGIT) on the embedded scenes", "",
             f"TiTok: {tc['image_size']} px, patch {tc['patch_size']}, {tc['num_tokens']} tokens, ViT width "
             f"{tc['encoder']['width']} depth {tc['encoder']['depth']} (encoder and decoder), VQ of "
             f"{q['num_codes']} l2-normalised codes x {q['code_dim']} channels with dead-code restarts after "
             f"{q['dead_code_steps']} unused steps; no text. Trained {cfg.max_steps} steps x {cfg.batch_size} images "
             f"(l2 + the quantizer's codebook/commitment terms) on {cfg.data.train_size or 4000} scenes; evaluated on "
             f"{result['val_images']} held-out scenes.", ""]
    if comp.get("table"):
        lines += ["## TexTok vs the no-text baseline vs TiTok (same held-out scenes)", "",
                  markdown_table(comp["table"]), "", f"Note: {comp['note']}. Training steps: "
                  + ", ".join(f"{k} {v}" for k, v in comp["train_steps"].items()) + ".", ""]
    else:
        lines += ["## TiTok reconstruction", "", markdown_table(_titok_rows(result)), "",
                  f"No TexTok comparison: {comp.get('note', '')}", ""]
    lines += ["## Codebook", "",
              f"Held-out scenes use {cb['used']} of {cb['size']} codes ({cb['usage']:.1%}), perplexity "
              f"{cb['perplexity']:.1f}; the most common code takes {cb['most_common_share']:.1%} of the "
              f"{cb['tokens']} tokens. Last training log (one batch): "
              + ", ".join(f"{k} {v:.4g}" for k, v in cb["train_log"].items() if k != "step") + ".", "",
              "## MaskGIT", "",
              f"Class-conditional ({len(result['rows'])} classes = the main object's shape), width "
              f"{gm['transformer']['width']} depth {gm['transformer']['depth']}, trained {gcfg.max_steps} steps x "
              f"{gcfg.batch_size} on the codes of {gen['train_scenes']} training scenes. Masked-token "
              f"cross-entropy (chance: ln K = {gen['heldout']['chance_loss']:.2f}):", "",
              markdown_table([
                  {"set": "training batches (mean of the last logs)",
                   "loss": gen["train_last_logs"].get("loss", float("nan")),
                   "accuracy": gen["train_last_logs"].get("accuracy", float("nan"))},
                  {"set": f"held-out scenes ({gen['heldout']['images']} images, "
                          f"{gen['heldout']['mask_draws']} mask draws)",
                   "loss": gen["heldout"]["loss"], "accuracy": gen["heldout"]["accuracy"]},
                  {"set": "held-out scenes, null class (same masks)", "loss": gen["heldout"]["loss_unconditional"],
                   "accuracy": gen["heldout"]["accuracy_unconditional"]}]), "",
              _class_sentence(gen["heldout"]["class_gain_nats"]), "",
              "Samples, one row per class (" + ", ".join(result["rows"].values()) + "), 8 MaskGIT steps, guidance 2:",
              "", "![samples](samples.png)", "",
              "The tokenizer's reconstructions of real training scenes of the same classes, for reference:", "",
              "![reference](reference.png)", "",
              "## Time", "",
              f"Wall seconds of this invocation (a resumed run skips training): "
              f"{sum(result['seconds'].values()):.1f} in all, "
              + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()) + ". Training throughput (median over "
              "the logs): TiTok {:.1f} steps/s, MaskGIT {:.1f} steps/s.".format(
                  result["throughput"]["titok_steps_per_s"], result["throughput"]["maskgit_steps_per_s"]), ""]
    notes = result["titok"].get("metric_notes") or {}
    skipped = result["titok"].get("skipped") or {}
    if notes:
        lines += ["Notes on the metrics:", ""] + [f"- **{k}**: {v}" for k, v in notes.items()] + [""]
    if skipped:
        lines += ["Not computed here:", ""] + [f"- **{k}**: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(lines)


def _class_sentence(gain: float, threshold: float = 0.05) -> str:
    """What the held-out gap between the null class and the true class says about the sample grid's rows."""
    verdict = ("the class informs the codes, so the rows of the sample grid can differ by class" if gain >= threshold
               else "the codes barely depend on the class, so the rows of the sample grid cannot differ by shape "
                    "beyond chance: the tokenizer does not yet reconstruct the small objects that define the class "
                    "(compare reference.png)")
    return (f"Held-out loss with the null class minus with the true class: {gain:+.3f} nats per masked token "
            f"(positive = the class helps; threshold {threshold}): {verdict}.")
