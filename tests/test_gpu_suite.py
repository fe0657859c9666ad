"""The GPU suite cannot rot between GPU sessions: its CPU mode runs every phase at tiny sizes, through the
same pack (pruned float16 MiniLM, float16 open_nsfw, a gzip tar) that travels to the GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_runs_every_phase(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "==== GPU suite summary ====" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what the device tool returns
    assert {"gpu_suite.json", "gpu_suite.md", "correctness.log", "study_report.md", "study_grid.png"} <= set(files)
    summary = json.loads((out / "gpu_suite.json").read_text())
    phases = summary["phases"]
    assert set(phases) == {"a", "b", "c"} and not any("error" in p for p in phases.values()), phases
    assert phases["a"]["counts"]["failed"] == 0 and len(phases["a"]["tests"]) >= 8  # collected, skipped on a CPU
    rows = {r["row"]: r for r in phases["b"]["rows"]}
    assert not phases["b"]["errors"] and not phases["b"]["not_run"], phases["b"]
    assert {"dit_xl_fwd_32", "textok_encode_text", "textok_step_all_text", "dit_xl_step_32"} <= set(rows)
    assert all(r["images_per_s"] > 0 and r["gflop_per_image"] > 0 for r in rows.values())
    study = phases["c"]
    assert study["cells"] == 2 and study["steps_per_cell"] == 4 and study["verdicts"]
    modes = {r["cell"] for r in study["text_reliance_table"]}
    assert modes == {"n2-decoder"}  # the text cell was also scored with another image's caption
    assert "## c. Flowers-102 study at 64 px" in (out / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_gpu_probe_cpu_smoke_measures_every_part(tmp_path) -> None:
    """The probe (benchmarks/gpu_probe.py) uses the library's training parts: its CPU mode must keep running."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_probe.py", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
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
