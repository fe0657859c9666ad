"""The study helpers under benchmarks/: the scenes exporter and the factor summary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from textok.data.factory import build_dataset

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_scenes_keeps_the_pixels_and_changes_only_the_captions(tmp_path):
    export = _load("export_scenes")
    scenes = build_dataset("scenes", "train", 16, size=4)
    for detail in export.DETAIL:
        out = export.export(tmp_path / detail, detail, train=4, val=2, size=16, seed=0)
        folder = build_dataset(str(out), "train", 16)
        assert len(folder) == 4 and len(build_dataset(str(out), "val", 16)) == 2
        for i in range(4):
            assert torch.equal(folder[i]["image"], scenes[i]["image"])  # the same 8-bit pixels
        caps = folder[0]["captions"]
        scene = scenes.scene(0)
        if detail == "full":
            assert caps == scenes[0]["captions"]
        elif detail == "class":
            assert caps == [f"A drawing with a {scene.objects[0].shape}."]
        elif detail == "objects":
            assert all(o.color in caps[0] and o.shape in caps[0] for o in scene.objects)
            assert not any(o.position in caps[0] for o in scene.objects)
        else:
            assert scene.bg_colors[0] in caps[0] and scene.objects[0].shape not in caps[0]


def test_study_summary_tabulates_gain_reliance_and_generation(tmp_path):
    summary = _load("study_summary")

    def cell(psnr, wrong=None):
        c = {"metrics": {"PSNR": psnr}}
        if wrong is not None:
            c["metrics_wrong_caption"] = {"PSNR": wrong}
        return c

    result = {"recipe": "r", "data": "d", "max_steps": 1, "batch_size": 2, "tokens": [4], "modes": ["decoder", "none"],
              "metrics": ["PSNR"], "higher_is_better": {"PSNR": True},
              "cells": {"n4-decoder": cell(22.0, 20.0), "n4-none": cell(20.0)},
              "train_config": {"data": {"train_size": 0, "captions_per_image": 5}, "max_steps": 1, "seed": 0,
                               "optim": {"lr": 1e-3},
                               "loss": {"perceptual": "none", "perceptual_size": 64, "adversarial": {"weight": 0.0}}}}
    (tmp_path / "s").mkdir()
    (tmp_path / "s/results.json").write_text(json.dumps(result))
    out = summary.main(["--out", str(tmp_path / "sum"), f"a=b={tmp_path / 's'}"])
    row = out["rows"][0]
    assert row["study"] == "a=b" and row["no text"] == 20.0 and row["text: decoder"] == 22.0
    assert row["best text gain"] == "+10.0% (decoder)" and row["its cost of a wrong caption"] == "+10.0%"
    assert (tmp_path / "sum.md").read_text().count("| a=b |") == 2  # the table row and the studies row


def test_study_summary_borrows_the_no_text_cells_of_a_base_study(tmp_path):
    """A text-only factor study (one decoder cell) is compared with its reference study's no-text cell."""
    summary = _load("study_summary")
    common = {"recipe": "r", "data": "d", "max_steps": 1, "batch_size": 2, "tokens": [4], "metrics": ["PSNR"],
              "higher_is_better": {"PSNR": True},
              "train_config": {"data": {"train_size": 0, "captions_per_image": 5}, "max_steps": 1, "seed": 0,
                               "optim": {"lr": 1e-3}, "text_dropout": 0.2,
                               "loss": {"perceptual": "none", "perceptual_size": 64, "adversarial": {"weight": 0.0}}}}
    base = {**common, "modes": ["decoder", "none"],
            "cells": {"n4-decoder": {"metrics": {"PSNR": 21.0}}, "n4-none": {"metrics": {"PSNR": 20.0}}}}
    factor = {**common, "modes": ["decoder"], "cells": {"n4-decoder": {"metrics": {"PSNR": 18.0}}}}
    for name, result in (("base", base), ("factor", factor)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    out = summary.main(["--out", str(tmp_path / "sum"), f"f={tmp_path / 'factor'}@{tmp_path / 'base'}"])
    row = out["rows"][0]
    assert row["no text"] == 20.0 and row["best text gain"] == "-10.0% (decoder)"
    assert "text dropout=0.2" in out["studies"]["f"]["overrides"]
    alone = summary.main(["--out", str(tmp_path / "sum2"), f"f={tmp_path / 'factor'}"])
    assert alone["rows"][0]["no text"] is None and alone["rows"][0]["best text gain"] == ""
