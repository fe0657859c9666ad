"""The GPU suite cannot rot between GPU sessions: its CPU mode runs every phase at tiny sizes, through the
same pack (pruned float16 MiniLM, float16 open_nsfw, a gzip tar) that travels to the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_gpu_smoke_runs_every_phase(tmp_path) -> None:
    """``make gpu-smoke`` (with this interpreter, without rebuilding the venv) runs all four phases tiny."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: ~2.5 minutes, also beside the other test workers
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "gpu-smoke", f"BIN={Path(sys.executable).parent}",
                           f"GPU_SMOKE_OUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "==== GPU suite summary ====" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what the device tool returns
    assert {"gpu_suite.json", "gpu_suite.md", "correctness.log", "study_stage1.md", "study_stage1_grid.png",
            "study_stage2.md"} <= set(files)
    summary = json.loads((out / "gpu_suite.json").read_text())
    phases = summary["phases"]
    assert list(phases) == ["a", "b", "d", "c"] and not any("error" in p for p in phases.values()), phases
    assert phases["a"]["counts"]["failed"] == 0 and len(phases["a"]["tests"]) >= 9  # collected, skipped on a CPU
    rows = {r["row"]: r for r in phases["b"]["rows"]}
    assert not phases["b"]["errors"] and not phases["b"]["not_run"], phases["b"]
    assert {"dit_xl_fwd_32", "textok_encode_text", "textok_encode_text_fp8", "textok_encode_text_masked",
            "textok_step_all_text_fast", "textok_step_all_text_fast_native", "dit_xl_step_32"} <= set(rows)
    assert all(r["images_per_s"] > 0 and r["gflop_per_image"] > 0 for r in rows.values())
    assert rows["textok_encode_text_fp8"]["precision"].endswith("fp8 blocks")
    assert rows["textok_encode_text_masked"]["attention_mask"] and not rows["textok_encode_text"]["attention_mask"]
    parts = [r["part"] for r in phases["b"]["step_parts"]["rows"]]
    assert len(parts) == 6 and parts[-1] == "whole step"
    d = phases["d"]
    assert not d["errors"] and set(d["rows"]) == {"dit_xl2_256", "titok_maskgit", "textok_dit_256", "var_imagefolder",
                                                  "dit_xl2_512", "textok_dit_512"}
    assert {q["paper"] for q in d["ratios"]} >= {74.0, 93.5} and all(q["ratio"] > 0 for q in d["ratios"])
    study = phases["c"]
    assert study["tokens"] == 8 and study["modes"] == ["decoder", "none"]
    assert [study["stages"][s]["steps"] for s in ("stage1", "stage2")] == [4, 4]
    verdict = study["stages"]["stage1"]["verdict"]
    assert verdict["PSNR"] in ("undecided", "text better", "text worse") and "swap_cost_PSNR_dB" in verdict["cells"]["decoder"]
    md = (out / "gpu_suite.md").read_text()
    assert "## c. Flowers-102 study at 64 px" in md and "## d. speed headlines" in md and "MFU per part" in md


@pytest.mark.slow
def test_gpu_probe_cpu_smoke_measures_every_part(tmp_path) -> None:
    """The probe (benchmarks/gpu_probe.py) uses the library's training parts: its CPU mode must keep running."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_probe.py", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_probe.json").read_text())
    parts = [v for part in result.values() if isinstance(part, dict) for k, v in part.items() if k.endswith("_ms")]
    assert len(parts) >= 3 and all(v > 0 for v in parts), result


def test_pack_prunes_minilm_exactly_and_refuses_what_does_not_travel(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_pack
    from make_tiny_data import write_tiny_captioned_tar

    from textok.text.encoders import HFTextEncoder, load_text_encoder

    data = write_tiny_captioned_tar(tmp_path / "tiny.tar", images=6, size=32, held_out=2)
    manifest = gpu_pack.build(data, tmp_path / "pack", check_sample=8, smoke=True)
    assert manifest["minilm"]["captions_checked_tokenization"] == len(gpu_pack.read_captions(data))
    assert manifest["minilm"]["states_relative_error_fp16_weights"] < 5e-3  # float16 weights, float32 compute
    # the pruned encoder, loaded the way a training run loads it, gives the full model's states
    pruned = HFTextEncoder(tmp_path / "pack" / "minilm-flowers", max_length=64)
    full = load_text_encoder("minilm", 64)
    caps = gpu_pack.read_captions(data)[:5]
    a, b = pruned.encode(caps), full.encode(caps)
    assert torch.equal(a.mask, b.mask)
    rel = ((a.states - b.states)[a.mask].norm() / b.states[b.mask].norm()).item()
    assert rel < 5e-3, rel
    # a working tree that would not fit the 64 MiB the device tool carries is refused
    monkeypatch.setattr(gpu_pack, "TRAVEL_LIMIT", 1)
    with pytest.raises(gpu_pack.TextokError, match="exceed"):
        gpu_pack.build(data, tmp_path / "pack2", check_sample=8, smoke=False)


def _gpu_study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_study

    return gpu_study


def test_study_schedule_fits_thousands_of_steps_in_the_budget() -> None:
    """The plan the suite computes from a measured step time: stage 1 gets thousands of steps per cell at the
    step times the H200 measurements predict for the study shape, the GAN stage a quarter of the time, and the
    whole plan stays inside the budget (margin, evaluation and report set aside)."""
    gs = _gpu_study()
    plan = gs.study_schedule(0.025, 0.060, 240.0, cells=2)
    assert plan.stage1_steps >= 2000 and plan.stage2_steps >= 300, plan
    assert plan.stage1_steps % 50 == 0 and plan.stage2_steps % 50 == 0
    budgeted = plan.seconds + 2 * 2 * 10.0 + 15.0  # + evaluation of both stages and the report
    assert 0.8 * 240 <= budgeted <= 0.9 * 240 + 1e-6, (plan, budgeted)
    # a slower step buys proportionally fewer steps; too few GAN steps give all the time to stage 1
    slow = gs.study_schedule(0.050, 0.120, 240.0, cells=2)
    assert slow.stage1_steps < plan.stage1_steps
    no_gan = gs.study_schedule(0.025, 2.0, 240.0, cells=2)
    assert no_gan.stage2_steps == 0 and no_gan.stage1_steps > plan.stage1_steps
    with pytest.raises(ValueError, match="does not fit"):
        gs.study_schedule(1.0, 2.0, 60.0, cells=2)
    # the FLOP-based expectation for the recipe's shape lies where the schedule above was sized
    from textok.models.registry import resolve_tokenizer_config
    from textok.train.config import load_train_config

    cfg = load_train_config("study-flowers-gpu", ["model.num_tokens=8"])
    _, model_cfg = resolve_tokenizer_config(cfg.model, cfg.model_overrides)
    assert (model_cfg.patch_size, model_cfg.encoder.width, model_cfg.encoder.depth,
            model_cfg.encoder.width // model_cfg.encoder.heads) == (8, 384, 4, 64)
    expected = gs.expected_step_ms(gs.forward_flops(model_cfg), cfg.batch_size)
    assert 10 < expected["stage1_ms"] < 40 and expected["stage2_ms"] > expected["stage1_ms"], expected


def test_seed_spread_and_verdict_from_the_cpu_study_records() -> None:
    gs = _gpu_study()
    spread = gs.seed_spread()  # two seeds of the 32-px CPU recipe, in benchmarks/results
    assert {"n4-decoder", "n4-none"} <= set(spread["cells"])
    assert 0 < spread["PSNR_dB"] < 1 and 0 < spread["FD_relative"] < 0.5, spread
    fd = spread["fd_metric"]
    cell = lambda psnr, d, wrong=None: {"metrics": {"PSNR": psnr, fd: d},  # noqa: E731
                                        **({"metrics_wrong_caption": wrong} if wrong else {})}
    big = gs.verdict(cell(20.0, 500.0, {"PSNR": 19.5, fd: 550.0}), cell(19.0, 700.0), spread)
    assert big["decided"] and big["PSNR"] == big["FD"] == "text better"
    assert abs(big["cells"]["decoder"]["swap_cost_PSNR_dB"] - 0.5) < 1e-9
    small = gs.verdict(cell(19.0 + spread["PSNR_dB"] / 2, 700.0), cell(19.0, 700.0), spread)
    assert not small["decided"] and small["PSNR"] == "undecided"
    mixed = gs.verdict(cell(20.0, 900.0), cell(19.0, 700.0), spread)  # PSNR better, FD worse: not decided
    assert not mixed["decided"] and mixed["FD"] == "text worse"


def test_step_parts_table_at_tiny_size(tmp_path, capsys) -> None:
    """benchmarks/step_parts.py on the CPU: every part of the step timed and FLOP-counted, a table and JSON."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_parts

    out = tmp_path / "parts.json"
    step_parts.main(["--preset", "textok-tiny", "--batch", "2", "--text-len", "5", "--iters", "1",
                     "--perceptual-size", "0", "--channels-last", "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    parts = {r["part"]: r for r in result["rows"]}
    assert len(parts) == 6 and all(r["ms"] > 0 for r in parts.values())
    assert all(parts[p]["GFLOP/img"] > 0 for p in parts if "AdamW + EMA" not in p)
    assert result["perceptual_size"] == 16 and result["channels_last"]  # 0: the images' own size
    # the whole step's FLOPs are the parts' (the tokenizer's ℓ2 and the losses' passes), within the small terms
    whole = parts["whole step"]["GFLOP/img"]
    assert 0.9 * whole <= sum(r["GFLOP/img"] for p, r in parts.items() if p != "whole step") <= 1.1 * whole
    assert "discriminator update" in printed and "whole step" in printed
