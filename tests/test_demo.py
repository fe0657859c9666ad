"""`textok demo` at a minimal size: both runs train, the report is computed from the evaluation."""

import json

from textok.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    for name in ("grid.png", "metrics.json", "report.md", "baseline/final/model.safetensors",
                 "textok/final/model.safetensors"):
        assert (out / name).is_file(), name
    result = json.loads((out / "metrics.json").read_text())
    base, text = result["metrics"]["baseline"], result["metrics"]["textok"]
    assert base["num_images"] == text["num_images"] == 16
    # the table is derived from the two evaluations, not written by hand
    psnr_row = next(r for r in result["table"] if r["metric"].startswith("PSNR"))
    assert psnr_row["baseline"] == f"{base['PSNR']:.4f}" and psnr_row["TexTok"] == f"{text['PSNR']:.4f}"
    assert psnr_row["text helps"] == ("yes" if text["PSNR"] > base["PSNR"] else "no")
    # same budget for both runs; only the text switches differ
    cfg_b = json.loads((out / "baseline/train_config.json").read_text())
    cfg_t = json.loads((out / "textok/train_config.json").read_text())
    assert cfg_b["max_steps"] == cfg_t["max_steps"] and cfg_b["batch_size"] == cfg_t["batch_size"]
    own_b = {k: v for k, v in cfg_b["model_overrides"].items() if cfg_t["model_overrides"].get(k) != v}
    assert own_b == {"text_in_encoder": False, "text_in_decoder": False}  # stored typed
    report = (out / "report.md").read_text()
    assert "| PSNR" in report and "grid.png" in report
    printed = capsys.readouterr().out
    assert "text helps" in printed
    # a second run skips finished training (the runs are resumable) and re-evaluates
    assert main(["demo", "--out", str(out), "--quick"]) == 0


def test_demo_quick_recipe_is_the_demo_at_a_smaller_budget():
    import dataclasses

    from textok.cli import build_parser
    from textok.train.config import load_train_config

    demo, quick = load_train_config("demo"), load_train_config("demo-quick")
    assert (quick.max_steps, quick.batch_size, quick.data.train_size, quick.data.val_size) == (400, 16, 500, 100)
    same = ("model", "loss", "optim", "ema_decay", "seed")
    assert all(getattr(quick, k) == getattr(demo, k) for k in same)
    assert dataclasses.replace(quick, max_steps=demo.max_steps, batch_size=demo.batch_size,
                               data=demo.data) == demo  # nothing else differs
    assert build_parser().parse_args(["demo", "--recipe", "demo-quick"]).recipe == "demo-quick"
