"""Phase c of the GPU suite: the 64-px Flowers-102 study sized so that it can give a verdict in its budget.

Two cells at one token count (N = 8: one token per 8 of the 64 patches, the paper's ratio of 32 tokens to 256
patches): text in the decoder vs no text, recipe ``study-flowers-gpu`` (patch 8, width 384, depth 4 per side,
64-d heads). Stage 1 trains ℓ2 + perceptual; stage 2 (+ the hinge GAN with LeCAM, started from stage 1's
weights) runs only when stage 1 reconstructs (the no-text cell's PSNR at least ``GAN_GATE_PSNR``): a GAN on a
tokenizer that has not learnt to encode is what collapsed the first H200 runs (PSNR 10-13 dB after 200-300
steps per cell, benchmarks/results/gpu-suite-h200.md).

The step count comes from :func:`study_schedule`, a pure function of the measured seconds per step of each
stage and the phase's budget (tests/test_gpu_suite.py checks it). Before measuring, :func:`expected_step_ms`
gives the FLOP-based expectation from the H200 measurements of the previous shape, which the report prints
beside the measurement.

A difference between the two cells is *decided* when it exceeds the seed spread of the same metric measured
on the CPU recipe (two seeds of ``study-flowers``: benchmarks/results/study-flowers-32px-cpu and
study-flowers-32px-cpu-seed1), read by :func:`seed_spread`. That spread comes from another (32-px, smaller)
recipe; the GPU recipe's own spread would need twice the cells.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEED_RUNS = (RESULTS / "study-flowers-32px-cpu", RESULTS / "study-flowers-32px-cpu-seed1")
RECIPE = "study-flowers-gpu"
TOKENS = 8
MODES = ("decoder", "none")
GAN_GATE_PSNR = 15.0  # dB: 2 dB above the collapsed H200 cells (10-13 dB); the 32-px CPU cells reach 15.6-19.7 dB

# Measured on an H200 (benchmarks/results/gpu-suite-h200.md, gpu-probe-h200/gpu_probe.json), batch 512 at 64 px:
# the previous study shape's tokenizer forward + backward (l2) took 93.5 ms for ~20 GFLOP per image (~110 TFLOP/s),
# the open_nsfw perceptual loss added 21.1 ms and the discriminator (generator pass and its own update) 77.2 ms.
H200_TOKENIZER_TFLOPS = 110.0
H200_PERCEPTUAL_MS_PER_IMAGE = 21.1 / 512
H200_GAN_MS_PER_IMAGE = 77.2 / 512


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """How many steps each stage trains per cell, and what that is expected to cost."""

    stage1_steps: int  # ℓ2 + perceptual
    stage2_steps: int  # + GAN, from stage 1's weights (0: not planned)
    cells: int
    seconds_stage1: float
    seconds_stage2: float

    @property
    def seconds(self) -> float:
        return self.seconds_stage1 + self.seconds_stage2


def study_schedule(stage1_s_per_step: float, stage2_s_per_step: float, budget_s: float, cells: int = 2,
                   eval_s: float = 10.0, fixed_s: float = 15.0, margin: float = 0.1, gan_share: float = 0.25,
                   min_gan_steps: int = 300, round_to: int = 50, max_steps: int = 20000) -> StudyPlan:
    """The steps per cell of both stages that fit ``budget_s``.

    Of the budget, ``margin`` is kept back and ``fixed_s`` (report, grids) and ``eval_s`` per cell and stage are
    set aside; the GAN stage gets ``gan_share`` of what is left, unless that buys fewer than ``min_gan_steps``
    steps, in which case stage 1 gets everything. Steps are rounded down to ``round_to`` and capped at
    ``max_steps``; a stage 1 that does not fit even ``round_to`` steps is an error (the budget is too small)."""
    if stage1_s_per_step <= 0 or stage2_s_per_step <= 0 or cells < 1:
        raise ValueError("step times must be positive and cells at least 1")
    usable = budget_s * (1 - margin) - fixed_s - cells * eval_s

    def steps(seconds: float, per_step: float) -> int:
        return min(max_steps, int(seconds / cells / per_step) // round_to * round_to)

    gan = steps((usable - cells * eval_s) * gan_share, stage2_s_per_step)
    if gan < min_gan_steps:
        gan = 0
    left = usable - (cells * eval_s + cells * gan * stage2_s_per_step if gan else 0.0)
    first = steps(left, stage1_s_per_step)
    if first < round_to:
        raise ValueError(f"a budget of {budget_s:.0f} s does not fit {round_to} steps of {cells} cells at "
                         f"{stage1_s_per_step * 1e3:.1f} ms per step")
    return StudyPlan(first, gan, cells, round(cells * first * stage1_s_per_step, 1),
                     round(cells * gan * stage2_s_per_step, 1))


def expected_step_ms(flops_per_image_fwd: float, batch: int) -> dict[str, float]:
    """Milliseconds per step of both stages expected from FLOPs: the tokenizer's forward + backward (3x the
    forward) at the H200's measured tokenizer rate, the perceptual and GAN parts at their measured per-image cost
    (those networks do not change with the tokenizer's shape)."""
    tok = 3 * flops_per_image_fwd * batch / (H200_TOKENIZER_TFLOPS * 1e12) * 1e3
    stage1 = tok + H200_PERCEPTUAL_MS_PER_IMAGE * batch
    return {"tokenizer_ms": round(tok, 2), "stage1_ms": round(stage1, 2),
            "stage2_ms": round(stage1 + H200_GAN_MS_PER_IMAGE * batch, 2)}


def forward_flops(model_cfg, text_len: int = 24) -> float:
    """Forward FLOPs per image of a TexTok config (built on the meta device: no memory, no time)."""
    import torch

    from textok.models.textok import TexTok

    with torch.device("meta"):
        return TexTok(model_cfg).flops_per_image(text_len)


def seed_spread(runs: tuple[Path, Path] = SEED_RUNS) -> dict[str, Any]:
    """The largest difference between two seeds of the same cell, per metric: PSNR in dB, FD relative."""
    a, b = (json.loads((Path(r) / "results.json").read_text())["cells"] for r in runs)
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"{runs[0]} and {runs[1]} share no cell")
    fd = next(k for k in a[common[0]]["metrics"] if k.startswith("FD-"))
    psnr = max(abs(a[c]["metrics"]["PSNR"] - b[c]["metrics"]["PSNR"]) for c in common)
    fd_rel = max(abs(a[c]["metrics"][fd] - b[c]["metrics"][fd]) / min(a[c]["metrics"][fd], b[c]["metrics"][fd])
                 for c in common)
    return {"PSNR_dB": round(psnr, 4), "FD_relative": round(fd_rel, 4), "fd_metric": fd, "cells": common,
            "source": [str(Path(r).relative_to(ROOT)) if Path(r).is_relative_to(ROOT) else str(r) for r in runs]}


def verdict(text_cell: dict[str, Any], none_cell: dict[str, Any], spread: dict[str, Any]) -> dict[str, Any]:
    """PSNR, FD and the swap cost of each cell, and whether text in the decoder is decided better or worse."""
    mt, mn = text_cell["metrics"], none_cell["metrics"]
    fd = next(k for k in mt if k.startswith("FD-"))
    wrong = text_cell.get("metrics_wrong_caption", {})  # the next image's caption
    other = text_cell.get("metrics_other_caption", {})  # a caption of another class (where the study scores one)
    d_psnr = mt["PSNR"] - mn["PSNR"]
    d_fd = (mn[fd] - mt[fd]) / mn[fd]  # > 0: text lowers the distance

    def call(delta: float, limit: float) -> str:
        if abs(delta) <= limit:
            return "undecided"
        return "text better" if delta > 0 else "text worse"

    return {
        "cells": {"decoder": {"PSNR": mt["PSNR"], fd: mt[fd], "swap_cost_PSNR_dB": mt["PSNR"] - wrong.get("PSNR", mt["PSNR"]),
                              "swap_cost_FD_relative": (wrong[fd] - mt[fd]) / mt[fd] if fd in wrong else None,
                              "swap_cost_other_class_PSNR_dB": mt["PSNR"] - other["PSNR"] if "PSNR" in other else None},
                  "none": {"PSNR": mn["PSNR"], fd: mn[fd]}},
        "PSNR_gain_dB": d_psnr, "FD_gain_relative": d_fd,
        "PSNR": call(d_psnr, spread["PSNR_dB"]), "FD": call(d_fd, spread["FD_relative"]),
        "decided": abs(d_psnr) > spread["PSNR_dB"] and abs(d_fd) > spread["FD_relative"]
                   and (d_psnr > 0) == (d_fd > 0),
    }


def calibrate(common: list[str], work: Path, steps: int) -> tuple[float, float]:
    """Seconds per step of stage 1 and stage 2 measured in one short run of the text cell (the GAN from half way;
    the study's own text cache is written on the way), over the second half of each stage's logged steps."""
    from textok.apps.study.cells import cell_config
    from textok.train.tokenizer import train_tokenizer

    half = steps // 2
    cfg = cell_config(RECIPE, TOKENS, MODES[0], common + [f"max_steps={steps}", f"loss.adversarial.start_step={half}",
                                                          "log_every=1", f"ckpt_every={steps}"])
    train_tokenizer(cfg, work / "calibration", progress=False)
    log = [json.loads(line) for line in (work / "calibration" / "log.jsonl").read_text().splitlines()]
    rate = lambda entries: sum(e["images_per_s"] for e in entries) / len(entries)  # noqa: E731
    one = [e for e in log if half // 2 < e["step"] <= half] or log
    two = [e for e in log if e["step"] > half + (steps - half) // 2] or log
    return cfg.batch_size / rate(one), cfg.batch_size / rate(two)


def phase_study(pack_paths: dict[str, Path], out: Path, budget: float, smoke: bool, overrides: tuple[str, ...] = (),
                calib_steps: int = 40) -> dict[str, Any]:
    """Calibrate, plan, train stage 1, gate, train stage 2; the verdict per stage beside the seed spread."""
    from textok.apps.study import StudySettings, run_study
    from textok.models.registry import resolve_tokenizer_config
    from textok.train.config import load_train_config

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="textok-study-"))
    common = [f"data.source={pack_paths['data']}", f"model.text_encoder=hf:{pack_paths['minilm']}", *overrides]
    cache = [f"text_cache={work / 'stage1' / 'text_cache.safetensors'}"]  # stage 1's own cache, warmed here
    base = load_train_config(RECIPE, common + [f"model.num_tokens={TOKENS}"])
    _, model_cfg = resolve_tokenizer_config(base.model, base.model_overrides)
    expected = expected_step_ms(forward_flops(model_cfg), base.batch_size)
    s1, s2 = calibrate(common + cache, work, calib_steps)
    left = budget - (time.time() - t0)
    plan = (StudyPlan(4, 4, len(MODES), 0.0, 0.0) if smoke else study_schedule(s1, s2, left, cells=len(MODES)))
    print(f"study: {s1 * 1e3:.1f} / {s2 * 1e3:.1f} ms per step measured (expected from FLOPs "
          f"{expected['stage1_ms']} / {expected['stage2_ms']}) -> {plan.stage1_steps} + {plan.stage2_steps} steps "
          f"per cell, {plan.cells} cells", flush=True)
    spread = seed_spread()
    result: dict[str, Any] = {"recipe": RECIPE, "tokens": TOKENS, "modes": list(MODES), "batch": base.batch_size,
                              "ms_per_step_measured": {"stage1": round(s1 * 1e3, 2), "stage2": round(s2 * 1e3, 2)},
                              "ms_per_step_expected": expected, "plan": dataclasses.asdict(plan),
                              "seed_spread": spread, "stages": {}}
    stages = [("stage1", plan.stage1_steps, ["loss.adversarial.weight=0"], None)]
    if plan.stage2_steps:
        stages.append(("stage2", plan.stage2_steps, ["loss.adversarial.start_step=0", "optim.warmup_steps=0"],
                       work / "stage1"))
    for name, steps, extra, init in stages:
        if init is not None:
            psnr = result["stages"]["stage1"]["verdict"]["cells"]["none"]["PSNR"]
            if psnr < GAN_GATE_PSNR and not smoke:
                result["stages"][name] = {"skipped": f"stage 1 does not reconstruct yet (no-text PSNR {psnr:.2f} dB "
                                                     f"< {GAN_GATE_PSNR} dB): no GAN on it"}
                continue
        if init is not None and (init / "text_cache.safetensors").is_file():  # the same captions, encoded once
            (work / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(init / "text_cache.safetensors", work / name / "text_cache.safetensors")
        settings = StudySettings(tokens=(TOKENS,), modes=MODES, recipe=RECIPE, init_from_study=init,
                                 overrides=tuple(common + [f"max_steps={steps}", *extra]))
        t1 = time.time()
        res = run_study(work / name, settings, progress=False)
        cells = res["cells"]
        result["stages"][name] = {
            "steps": steps, "seconds": round(time.time() - t1, 1),
            "train_seconds": {k: c.get("train_seconds") for k, c in cells.items()},
            "verdict": verdict(cells[f"n{TOKENS}-decoder"], cells[f"n{TOKENS}-none"], spread)}
        for src, dst in (("report.md", f"study_{name}.md"), ("grid.png", f"study_{name}_grid.png")):
            if (work / name / src).is_file():
                shutil.copy(work / name / src, out / dst)
    result["seconds"] = round(time.time() - t0, 1)
    if not smoke:
        shutil.rmtree(work, ignore_errors=True)
    return result


def render(c: dict[str, Any]) -> list[str]:
    """The phase's section of gpu_suite.md."""
    sp = c["seed_spread"]
    lines = [f"Recipe `{c['recipe']}`, N={c['tokens']}, text in the decoder vs none, batch {c['batch']}; measured "
             f"{c['ms_per_step_measured']['stage1']} / {c['ms_per_step_measured']['stage2']} ms per step (stage 1 / "
             f"with the GAN; expected from FLOPs {c['ms_per_step_expected']['stage1_ms']} / "
             f"{c['ms_per_step_expected']['stage2_ms']}); plan {c['plan']['stage1_steps']} + "
             f"{c['plan']['stage2_steps']} steps per cell; {c['seconds']} s in all.",
             "", f"Seed spread (CPU recipe, {' vs '.join(sp['source'])}): PSNR {sp['PSNR_dB']} dB, "
             f"{sp['fd_metric']} {sp['FD_relative']:.1%}.", "",
             "| stage | steps | PSNR text / none | FD text / none | swap cost (dB) | PSNR | FD | decided |",
             "|---|---|---|---|---|---|---|---|"]
    for name, st in c["stages"].items():
        if "skipped" in st:
            lines.append(f"| {name} | skipped: {st['skipped']} | | | | | | |")
            continue
        v = st["verdict"]
        t, n = v["cells"]["decoder"], v["cells"]["none"]
        fd = next(k for k in t if k.startswith("FD-"))
        lines.append(f"| {name} | {st['steps']} | {t['PSNR']:.2f} / {n['PSNR']:.2f} | {t[fd]:.1f} / {n[fd]:.1f} | "
                     f"{t['swap_cost_PSNR_dB']:.3f} | {v['PSNR']} | {v['FD']} | {'yes' if v['decided'] else 'no'} |")
    return lines + [""]
