"""`textok demo-titok --quick`: the whole TiTok + MaskGIT pipeline end to end on tiny sizes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from PIL import Image

from textok.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("demo-titok")
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # no runs/demo/metrics.json here: the comparison is skipped, not an error
    try:
        rc = main(["demo-titok", "--out", str(out), "--quick"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    return out


def test_quick_run_writes_everything(quick_run):
    for name in ("samples.png", "reference.png", "metrics.json", "report.md", "titok/final/config.json",
                 "maskgit/final/config.json", "latents/meta.json", "val-latents/meta.json"):
        assert (quick_run / name).is_file(), name
    log = [json.loads(line) for line in (quick_run / "titok" / "log.jsonl").read_text().splitlines()]
    assert any("metric/perplexity" in e and "metric/codebook_usage" in e for e in log)


def test_metrics_come_from_the_evaluation(quick_run):
    from textok.data.factory import build_dataset
    from textok.data.folder import collate
    from textok.models.registry import load_tokenizer

    m = json.loads((quick_run / "metrics.json").read_text())
    tok = load_tokenizer(quick_run / "titok" / "final").eval()
    cfg = m["train_config"]["data"]
    val = build_dataset("scenes", cfg["val_split"], tok.config.image_size, size=cfg["val_size"], seed=cfg["seed"])
    batch = collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        recon = tok(batch["image"])[0].clamp(-1, 1)
    # independent PSNR: the evaluation rounds to 8-bit levels; do the same here
    q = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # noqa: E731
    mse = ((q(recon).double() - q(batch["image"]).double()) ** 2).mean(dim=(1, 2, 3))
    ref_psnr = float((10 * torch.log10(4.0 / mse)).mean())
    assert m["val_images"] == len(val) == m["titok"]["num_images"]
    assert abs(m["titok"]["PSNR"] - ref_psnr) < 1e-3
    assert 0.0 < m["titok"]["SSIM"] <= 1.0
    # codebook usage counted from the stored held-out codes
    codes = tok.encode_codes(batch["image"]).flatten()
    assert m["codebook"]["used"] == codes.unique().numel()
    assert m["codebook"]["size"] == tok.codebook_size
    assert 1.0 <= m["codebook"]["perplexity"] <= m["codebook"]["used"] + 1e-6
    # the MaskGIT numbers are real numbers from its log and the held-out codes
    gen = m["maskgit"]
    assert math.isfinite(gen["heldout"]["loss"]) and 0.0 <= gen["heldout"]["accuracy"] <= 1.0
    last = json.loads((quick_run / "maskgit" / "log.jsonl").read_text().splitlines()[-1])
    assert gen["train_last_logs"]["loss"] == pytest.approx(last["loss"])
    # the held-out loss is the model's masked-token cross-entropy on the held-out codes (eval mode: no label
    # drop; plain CE on the masked tokens, the quantity comparable with chance ln K, not the smoothed and weighted
    # training loss)
    import dataclasses

    from textok.generate.latents import LatentDataset
    from textok.models.registry import load_generator

    model, _ = load_generator(quick_run / "maskgit" / "final")
    model.eval()
    model.config = dataclasses.replace(model.config, label_smoothing=0.0, unmasked_loss_weight=0.0)
    data = LatentDataset(quick_run / "val-latents", normalize=False)
    draws = gen["heldout"]["mask_draws"]
    with torch.no_grad():
        losses = [float(model.training_loss(data.codes, data.labels, torch.Generator().manual_seed(1000 + k))["loss"])
                  for k in range(draws)]
    assert gen["heldout"]["loss"] == pytest.approx(sum(losses) / draws, rel=1e-5)
    assert gen["heldout"]["class_gain_nats"] == pytest.approx(
        gen["heldout"]["loss_unconditional"] - gen["heldout"]["loss"])
    assert "no" in m["comparison"]["note"] and "table" not in m["comparison"]
    assert f"{m['titok']['PSNR']:.4f}" in (quick_run / "report.md").read_text()


def test_samples_grid_has_one_row_per_class(quick_run):
    m = json.loads((quick_run / "metrics.json").read_text())
    meta = json.loads((quick_run / "latents" / "meta.json").read_text())
    size = m["tokenizer_config"]["image_size"]
    assert meta["num_classes"] == 8 and len(m["rows"]) == 8
    w, h = Image.open(quick_run / "samples.png").size
    assert h == 8 * size and w % size == 0 and w // size >= 2


def test_rerun_resumes_and_comparison_table(quick_run, tmp_path, capsys):
    """A second run skips training (same weights, codes kept) and joins a `textok demo` metrics.json."""
    tok_weights = (quick_run / "titok" / "final" / "model.safetensors").read_bytes()
    codes_stamp = (quick_run / "latents" / "tokenizer.sha256").read_text()
    fake = {"val_images": 16, "train_config": {"max_steps": 3, "model": "textok-demo", "model_overrides": [],
                                               "data": {"source": "scenes", "val_split": "val", "val_size": 16,
                                                        "seed": 0}},
            "metrics": {"baseline": {"PSNR": 1.0, "SSIM": 0.1, "num_images": 16},
                        "textok": {"PSNR": 2.0, "SSIM": 0.2, "num_images": 16}}}
    (tmp_path / "metrics.json").write_text(json.dumps(fake))
    capsys.readouterr()
    assert main(["demo-titok", "--out", str(quick_run), "--quick", "--compare", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "extracting" not in printed  # the codes were reused
    assert (quick_run / "titok" / "final" / "model.safetensors").read_bytes() == tok_weights
    assert (quick_run / "latents" / "tokenizer.sha256").read_text() == codes_stamp
    m = json.loads((quick_run / "metrics.json").read_text())
    table = m["comparison"]["table"]
    psnr = next(r for r in table if r["metric"].startswith("PSNR"))
    assert psnr["TexTok"] == "2.0000" and psnr["baseline (no text)"] == "1.0000"
    assert psnr["TiTok"] == f"{m['titok']['PSNR']:.4f}"
    assert "token budgets differ" in m["comparison"]["note"] and "TiTok" in printed
    budget = next(r for r in table if r["metric"] == "token budget")
    assert budget["TexTok"].startswith("4 tokens x 8") and "bits" in budget["TiTok"]


def test_bad_steps_is_a_user_error(tmp_path, capsys):
    assert main(["demo-titok", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
