"""``textok study``: the grid runs end to end through the CLI, resumes without retraining, and its verdicts
follow the numbers; the report helpers (captioned grid, Markdown table, line plot)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from textok.cli import main
from textok.errors import TextokError
from textok.report import HEADER, captioned_grid, line_plot, markdown_table
from textok.apps.study.cells import resolve_data
from textok.apps.study.claims import compare, judge, judge_generation, verdict_lines, verdicts
from textok.apps.study.cells import cell_config
from textok.apps.study.intervals import load_cells, replicates, seed_values
from textok.eval.compare import relative_gain

TINY_RECIPE = """
model: textok-tiny
data: {source: scenes, train_size: 16, val_size: 8, captions_per_image: 2}
optim: {lr: 1.0e-3, warmup_steps: 1}
loss: {perceptual: none, perceptual_size: 32, adversarial: {weight: 0.0}}
batch_size: 4
max_steps: 2
log_every: 1
sample_every: 0
ckpt_every: 2
"""


def _argv(out, recipe, *extra):
    return ["study", "--data", "scenes", "--out", str(out), "--recipe", str(recipe), "--tokens", "2", "4",
            "--modes", "both", "none", "--steps", "2", "--val-num", "8", "--fd-size", "32", "--no-progress", *extra]


def test_study_end_to_end_then_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "study"
    assert main(_argv(out, recipe)) == 0
    cells = ["n2-both", "n2-none", "n4-both", "n4-none"]
    for c in cells:
        assert (out / "cells" / c / "final" / "model.safetensors").is_file()
        assert (out / "cells" / c / "eval.json").is_file()
    cfgs = {c: json.loads((out / "cells" / c / "train_config.json").read_text()) for c in cells}
    assert {tuple(cfgs[c]["model_overrides"][k] for k in ("num_tokens", "text_in_encoder", "text_in_decoder"))
            for c in cells} == {(2, True, True), (2, False, False), (4, True, True), (4, False, False)}
    # same budget, seed and data, one shared text cache
    assert len({(d["max_steps"], d["seed"], json.dumps(d["data"]), d["text_cache"]) for d in cfgs.values()}) == 1
    assert (out / "text_cache.safetensors").is_file()

    res = json.loads((out / "results.json").read_text())
    assert "PSNR" in res["metrics"] and "FD-opennsfw@32" in res["metrics"]
    for m in res["metrics"]:
        assert (out / f"plot_{m.replace('@', '_')}.png").stat().st_size > 1000
    assert (out / "grid.png").is_file()
    from PIL import Image

    assert Image.open(out / "grid.png").size[0] == 3 * (16 * 4 + 4) + 560  # original | no text | text: both
    # the verdicts are recomputed here from the per-cell numbers, not copied from the run
    by_mode = {m: {n: {k: v for k, v in res["cells"][f"n{n}-{m}"]["metrics"].items() if k in res["metrics"]}
                   for n in (2, 4)} for m in ("both", "none")}
    arrays = load_cells(out, (2, 4), ("both", "none"))
    assert set(arrays["n2-both"]) >= {"PSNR", "SSIM", "PSNR/next", "PSNR/other", "originals/FD-opennsfw@32",
                                      "reconstructions/FD-opennsfw@32"} and len(arrays["n2-both"]["PSNR"]) == 8
    assert "KID-opennsfw@32" in res["metrics"] and res["noise"]["bootstrap_replicates"] == 200
    boot = replicates(arrays, (2, 4), ("both", "none"), res["metrics"], 200)
    assert res["verdicts"] == verdict_lines(verdicts(by_mode, res["metrics"], boot), res["primary_metrics"])
    assert "straddles zero is **undecided**" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    for line in res["verdicts"]:
        assert line in report
    assert "C4" in report and "not run" in report and '"seed": 0' in report
    # text cells are also scored with another image's caption; the no-text cells need not be
    for n in (2, 4):
        wrong = res["cells"][f"n{n}-both"]["metrics_wrong_caption"]
        assert wrong["PSNR"] != res["cells"][f"n{n}-both"]["metrics"]["PSNR"]  # the text changes the output
        assert "metrics_wrong_caption" not in res["cells"][f"n{n}-none"]
        # and with a caption of another class (the scenes' classes are their main shapes)
        other = res["cells"][f"n{n}-both"]["metrics_other_caption"]
        assert res["cells"][f"n{n}-both"]["other_caption_kind"] == "another class"
        assert other["PSNR"] != res["cells"][f"n{n}-both"]["metrics"]["PSNR"]
    assert {"next image's caption", "caption of another class", "cost (another class)"} <= set(
        res["text_reliance_table"][0])
    assert len(res["text_reliance_table"]) == 2 * len(res["primary_metrics"])
    assert "## Does the tokenizer use the text?" in report
    assert len(res["paper_table"]) == 2 * len(res["metrics"])
    first_row = res["paper_table"][0]
    psnr_none = res["cells"]["n2-none"]["metrics"][res["metrics"][0]]
    assert first_row["no text"] == psnr_none

    # re-run: every cell is finished and evaluated, so nothing trains or evaluates again
    logs = {c: (out / "cells" / c / "log.jsonl").read_text() for c in cells}

    def boom(*a, **k):
        raise AssertionError("a finished cell was retrained / re-evaluated")

    monkeypatch.setattr("textok.apps.study.cells.train_tokenizer", boom)
    (out / "cells" / "n4-none" / "eval.json").unlink()  # this one must be re-evaluated, not retrained
    capsys.readouterr()
    assert main(_argv(out, recipe)) == 0
    assert "n2-both: done" in capsys.readouterr().out
    assert {c: (out / "cells" / c / "log.jsonl").read_text() for c in cells} == logs
    assert (out / "cells" / "n4-none" / "eval.json").is_file()
    monkeypatch.setattr("textok.apps.study.cells.evaluate_tokenizer", boom)
    assert main(_argv(out, recipe)) == 0
    # a cell without final/ goes back through train_tokenizer (which resumes from its checkpoint); only that one
    import shutil

    from textok.train.tokenizer import train_tokenizer

    calls = []
    monkeypatch.undo()  # the real evaluate_tokenizer again; train_tokenizer counted
    monkeypatch.setattr("textok.apps.study.cells.train_tokenizer", lambda cfg, out, progress: calls.append(out.name)
                        or train_tokenizer(cfg, out, progress))
    shutil.rmtree(out / "cells" / "n2-none" / "final")
    assert main(_argv(out, recipe)) == 0
    assert calls == ["n2-none"] and (out / "cells" / "n2-none" / "final" / "model.safetensors").is_file()
    # another budget into the same --out is refused clearly, never mixed in
    assert main(_argv(out, recipe, "optim.lr=5e-4")) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "optim.lr" in err and "Traceback" not in err


def _values(both, enc, dec, none, ns=(16, 32, 64)):
    return {"both": dict(zip(ns, both)), "encoder": dict(zip(ns, enc)), "decoder": dict(zip(ns, dec)),
            "none": dict(zip(ns, none))}


def test_verdicts_follow_the_numbers():
    # an FD (lower is better): text helps everywhere, most at N=16, order both < encoder < decoder < none
    good = _values([10, 8, 6], [11, 8.5, 6.2], [12, 9, 6.4], [20, 10, 7])
    v = judge(good, higher=False)
    assert v["C1"]["holds"] and v["C2"]["holds"] and v["C3"]["holds"]
    assert v["gains"]["16"] == pytest.approx(0.5) and v["gains"]["64"] == pytest.approx(1 / 7)
    # C1 fails: no text wins at N=64; C2 fails: the gain is largest at N=32; C3 holds at 16 and 32 only
    bad = _values([10, 5, 8], [11, 8.5, 6.2], [12, 9, 6.4], [12.5, 10, 7])
    v = judge(bad, higher=False)
    assert v["C1"]["holds"] is False and "not at N=64" in v["C1"]["detail"]
    assert v["C2"]["holds"] is False and "N=32" in v["C2"]["detail"]
    assert v["C3"]["holds"] is False and v["C3"]["holds_at"] == [16, 32]
    # the same numbers read as PSNR (higher is better) flip every verdict
    v = judge(good, higher=True)
    assert v["C1"]["holds"] is False and v["C3"]["holds_at"] == []
    assert v["C2"]["holds"] is False and "does not help at N=16" in v["C2"]["detail"]  # least harm is no gain
    # not testable without the needed modes / token counts
    v = judge({"both": {16: 1.0}, "none": {16: 2.0}}, higher=False)
    assert v["C1"]["holds"] is True and v["C2"]["holds"] is None and v["C3"]["holds"] is None
    # the summary lines name the verdicts for the primary metrics; C4 is "not run"
    lines = verdict_lines(verdicts({m: {n: {"FD-opennsfw@64": x, "PSNR": 30 - x} for n, x in per.items()}
                                    for m, per in good.items()}, ["FD-opennsfw@64", "PSNR"]),
                          ["FD-opennsfw@64", "PSNR"])
    assert lines[0].startswith("C1") and "FD-opennsfw@64 holds" in lines[0] and "PSNR holds" in lines[0]
    assert lines[3].startswith("C4") and "not run" in lines[3]
    assert relative_gain(30.0, 25.0, True) == pytest.approx(0.2) and relative_gain(8.0, 10.0, False) == pytest.approx(0.2)


def test_verdicts_with_noise_can_be_undecided():
    rng = np.random.default_rng(0)
    values = {"both": {1: 10.0, 4: 8.0}, "none": {1: 12.0, 4: 9.0}}  # an FD: text better at both N

    def reps(spread):  # replicates around each value, the same noise draw for the pair at one N (paired)
        noise = {n: rng.normal(0, spread, 500) for n in (1, 4)}
        return {m: {n: v + noise[n] * (1 if m == "both" else -1) for n, v in per.items()} for m, per in values.items()}

    firm = judge(values, higher=False)
    assert firm["C1"]["verdict"] == "holds" and firm["C2"]["verdict"] == "holds"
    tight = judge(values, higher=False, replicates=reps(0.05))
    assert tight["C1"]["verdict"] == "holds" and tight["C2"]["holds"] is True
    lo, hi = tight["C1"]["comparisons"]["1"]["interval"]
    assert lo < -2.0 < hi < 0  # centred on the measured difference, below zero
    wide = judge(values, higher=False, replicates=reps(2.0))
    assert wide["C1"]["verdict"] == "undecided" and wide["C1"]["holds"] is None
    assert "undecided at N=" in wide["C1"]["detail"] and "[" in wide["C1"]["detail"]
    assert wide["C2"]["verdict"] == "undecided"
    # one N decidedly worse: does not hold, whatever the other
    worse = {"both": {1: 10.0, 4: 11.0}, "none": {1: 12.0, 4: 9.0}}
    v = judge(worse, higher=False, replicates={m: {1: np.full(50, 0.0) + x[1] + rng.normal(0, 3, 50),
                                                   4: np.full(50, x[4])} for m, x in worse.items()})
    assert v["C1"]["verdict"] == "does not hold"
    # training seeds that disagree in sign make a comparison undecided; seeds that agree leave it decided
    assert compare(10.0, 12.0, False, seeds=[-1.5, -0.5])["outcome"] == "better"
    assert compare(10.0, 12.0, False, seeds=[+0.5])["outcome"] == "undecided"
    seeds = {"both": {1: {"FD": [12.5]}, 4: {"FD": [8.5]}}, "none": {1: {"FD": [12.0]}, 4: {"FD": [9.5]}}}
    cells = {m: {n: {"FD-x": v} for n, v in per.items()} for m, per in values.items()}
    seeded = verdicts(cells, ["FD-x"], seeds={m: {n: {"FD-x": d["FD"]} for n, d in per.items()}
                                               for m, per in seeds.items()})
    assert seeded["FD-x"]["C1"]["verdict"] == "undecided"  # at N=1 the second seed has text worse
    assert "per seed -2/+0.5" in seeded["FD-x"]["C1"]["detail"]
    # C3 at one N: a link whose interval straddles zero makes it undecided, not "fails"
    four = {"both": {1: 4.0}, "encoder": {1: 3.0}, "decoder": {1: 2.0}, "none": {1: 1.0}}  # PSNR-like
    noise = rng.normal(0, 0.1, 300)
    r = {m: {1: v[1] + noise} for m, v in four.items()}
    assert judge(four, True, r)["C3"]["verdict"] == "holds"
    r["encoder"][1] = 3.0 + rng.normal(0, 3.0, 300)
    assert judge(four, True, r)["C3"]["verdict"] == "undecided"


def test_replicate_studies_give_each_cell_its_values_under_other_seeds(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    configs = {(2, m): cell_config(str(recipe), 2, m, {"data.source": "scenes"}) for m in ("both", "none")}

    def write(root, seed, psnr, **changes):
        for (n, m), cfg in configs.items():
            d = {**cfg.to_dict(), "seed": seed, **changes}
            cell = root / "cells" / f"n{n}-{m}"
            cell.mkdir(parents=True, exist_ok=True)
            (cell / "eval.json").write_text(json.dumps({"train_config": d, "metrics": {
                "PSNR": psnr[m], "num_images": 8, "skipped": {}}}))

    write(tmp_path / "s1", 1, {"both": 9.0, "none": 9.5})
    write(tmp_path / "s2", 2, {"both": 9.4, "none": 9.1})
    values = seed_values([tmp_path / "s1", tmp_path / "s2"], configs)
    assert values == {"both": {2: {"PSNR": [9.0, 9.4]}}, "none": {2: {"PSNR": [9.5, 9.1]}}}
    write(tmp_path / "same", 0, {"both": 9.0, "none": 9.5})
    with pytest.raises(TextokError, match="same seed"):
        seed_values([tmp_path / "same"], configs)
    write(tmp_path / "other", 1, {"both": 9.0, "none": 9.5}, max_steps=99)
    with pytest.raises(TextokError, match="more than the seed.*max_steps"):
        seed_values([tmp_path / "other"], configs)
    with pytest.raises(TextokError, match="no evaluated cell"):
        seed_values([tmp_path / "absent"], configs)


def test_missing_data_and_study_owned_overrides_are_clear_errors(tmp_path, capsys):
    with pytest.raises(TextokError, match="not found"):
        resolve_data(str(tmp_path / "nope.tar"))
    assert resolve_data("scenes") == "scenes"
    rc = main(["study", "--data", str(tmp_path / "flickr.tar"), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "--data" in err
    rc = main(["study", "--data", "scenes", "--out", str(tmp_path / "o"), "model.num_tokens=8"])
    assert rc == 2 and "--tokens" in capsys.readouterr().err
    rc = main(["study", "--data", "scenes", "--out", str(tmp_path / "o"), "--recipe", "study-nope"])
    assert rc == 2 and "study-scenes" in capsys.readouterr().err


def test_report_helpers(tmp_path):
    g = torch.Generator().manual_seed(0)
    orig = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    path = captioned_grid({"original": orig, "recon": -orig}, ["a red circle", "a blue square " * 20],
                          tmp_path / "g.png", scale=4)
    from PIL import Image

    im = Image.open(path)
    assert im.size == (2 * (32 + 4) + 560, HEADER + 2 * (32 + 4))
    px = im.getpixel((3, HEADER + 3))  # inside the first (nearest-upscaled) pixel of the first original
    expected = tuple(int(round((float(orig[0, c, 0, 0]) + 1) * 127.5)) for c in range(3))
    assert all(abs(a - b) <= 1 for a, b in zip(px, expected))
    with pytest.raises(TextokError, match="captions"):
        captioned_grid({"original": orig}, ["one"], tmp_path / "x.png")

    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "c": "x|y"}])
    lines = table.splitlines()
    assert lines[0] == "| a | b | c |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| 1 | 0.1235 |  |" and lines[3] == "| 2 |  | x\\|y |"

    p = line_plot({"text": [(16, 1.0), (32, 2.0)], "none": [(16, 1.5), (32, float("nan"))]}, "N", "FD",
                  tmp_path / "p.png")
    assert Image.open(p).format == "PNG"


TINY_GEN_RECIPE = """
model: dit-tiny
model_overrides: [width=32, depth=1, heads=2]
diffusion: flow
batch_size: 4
max_steps: 2
ema_decay: 0.9
optim: {lr: 1.0e-3, warmup_steps: 1}
log_every: 1
ckpt_every: 2
"""


def _gen_argv(out, recipe, gen_recipe, data="scenes", *extra):
    return ["study", "--data", str(data), "--out", str(out), "--recipe", str(recipe), "--tokens", "2",
            "--modes", "decoder", "none", "--steps", "2", "--val-num", "8", "--fd-size", "32", "--no-progress",
            "--generation", "--gen-recipe", str(gen_recipe), "--gen-samples", "6", "--gen-seeds", "0", "1",
            "--gen-sampling-steps", "2", *extra]


def test_study_generation_c4_class_conditional_then_cached(tmp_path, monkeypatch, capsys):
    """--generation: a DiT per tokenizer (best text mode and none), samples scored per seed, a C4 verdict
    computed from those numbers, the report section and sample grid; a re-run reuses everything."""
    torch.set_num_threads(1)

    recipe, gen_recipe = tmp_path / "tiny.yaml", tmp_path / "gen.yaml"
    recipe.write_text(TINY_RECIPE)
    gen_recipe.write_text(TINY_GEN_RECIPE)
    out = tmp_path / "study"
    assert main(_gen_argv(out, recipe, gen_recipe)) == 0
    res = json.loads((out / "results.json").read_text())
    gen = res["generation"]
    assert gen["tokens"] == 2 and gen["text_mode"] == "decoder" and gen["baseline_mode"] == "none"
    assert not gen["text_to_image"]  # the scenes have classes
    runs = gen["runs"]
    assert set(runs) == {"n2-decoder", "n2-none"}
    for name, run in runs.items():
        assert (out / "generation" / name / "dit" / "final" / "model.safetensors").is_file()
        assert (out / "generation" / name / "latents" / "meta.json").is_file()
        assert len(run["sample_fd"]) == 2 and all(v > 0 for v in run["sample_fd"])
        assert run["samples"][0]["num_samples"] == 6 and run["recon_fd"] > 0
    # the two tokenizers' generators differ, so do their samples' scores
    assert runs["n2-decoder"]["sample_fd"] != runs["n2-none"]["sample_fd"]
    again = judge_generation(runs["n2-decoder"], runs["n2-none"], "decoder", 2)
    assert (gen["holds"], gen["verdict"], gen["detail"]) == (again["holds"], again["verdict"], again["detail"])
    assert res["verdicts"][-1].startswith("C4") and gen["verdict"] in res["verdicts"][-1]
    report = (out / "report.md").read_text()
    assert "## Generation (C4)" in report and gen["detail"] in report
    from PIL import Image

    assert Image.open(out / "generation.png").size[1] == 3 * 16  # 16-px reference row + one row per tokenizer

    # a re-run trains and samples nothing again
    def boom(*a, **k):
        raise AssertionError("a finished generator was retrained or re-sampled")

    monkeypatch.setattr("textok.apps.study.generation.train_generator", boom)
    monkeypatch.setattr("textok.apps.study.generation.evaluate_samples", boom)
    capsys.readouterr()
    assert main(_gen_argv(out, recipe, gen_recipe)) == 0
    assert "n2-none: done" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["generation"]["runs"] == runs
    # another generator budget into the same --out is refused, never mixed in
    gen_recipe.write_text(TINY_GEN_RECIPE.replace("max_steps: 2", "max_steps: 3"))
    assert main(_gen_argv(out, recipe, gen_recipe)) == 2
    err = capsys.readouterr().err
    assert "was trained with another config" in err and "Traceback" not in err


def test_study_generation_text_to_image_on_a_captioned_folder(tmp_path):
    """Data without classes (like Flickr8k): the generators are text-to-image, conditioned on held-out captions."""
    torch.set_num_threads(1)
    from PIL import Image

    data = tmp_path / "photos"
    rows = []
    for split, count in (("train", 12), ("val", 6)):
        (data / split).mkdir(parents=True)
        for i in range(count):
            color = (40 * (i % 6), 255 - 30 * (i % 8), 100 if split == "train" else 180)
            Image.new("RGB", (24, 24), color).save(data / split / f"{i}.png")
            rows.append({"file": f"{split}/{i}.png", "captions": [f"a flat colour number {i}", f"colour {i}"]})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, gen_recipe = tmp_path / "tiny.yaml", tmp_path / "gen.yaml"
    recipe.write_text(TINY_RECIPE.replace("source: scenes, train_size: 16, val_size: 8, ", "val_split: val, "))
    gen_recipe.write_text(TINY_GEN_RECIPE)
    out = tmp_path / "study"
    assert main(_gen_argv(out, recipe, gen_recipe, data, "--gen-seeds", "3")) == 0
    gen = json.loads((out / "results.json").read_text())["generation"]
    assert gen["text_to_image"] and gen["settings"]["condition"].startswith("first caption")
    assert all(len(r["sample_fd"]) == 1 for r in gen["runs"].values())
    assert gen["verdict"] in ("holds", "does not hold")  # one seed: never "inconclusive"


def test_study_generation_can_be_text_to_image_on_classed_data(tmp_path, capsys):
    """--gen-condition text on data with classes (like Flowers-102): text-to-image on held-out captions; asking
    for classes where there are none is refused in one line."""
    torch.set_num_threads(1)
    recipe, gen_recipe = tmp_path / "tiny.yaml", tmp_path / "gen.yaml"
    recipe.write_text(TINY_RECIPE)
    gen_recipe.write_text(TINY_GEN_RECIPE)
    out = tmp_path / "study"
    assert main(_gen_argv(out, recipe, gen_recipe, "scenes", "--gen-seeds", "0", "--gen-condition", "text")) == 0
    gen = json.loads((out / "results.json").read_text())["generation"]
    assert gen["text_to_image"] and gen["settings"]["condition"].startswith("first caption")
    assert set(gen["runs"]) == {"n2-decoder", "n2-none"}
    from textok.apps.study.settings import GenerationSettings
    from textok.errors import ConfigError

    with pytest.raises(ConfigError, match="--gen-condition 'both'"):
        GenerationSettings(condition="both")


def test_generation_options_need_generation_and_a_comparable_grid(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    assert main(_argv(tmp_path / "s", recipe, "--gen-steps", "3")) == 2
    assert "--gen-steps is given without --generation" in capsys.readouterr().err
    argv = _argv(tmp_path / "s", recipe, "--generation")
    argv[argv.index("--modes") + 1: argv.index("--modes") + 3] = ["both", "encoder"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--modes must include none" in err and "Traceback" not in err
    assert main(_argv(tmp_path / "s2", recipe, "--generation", "--gen-tokens", "3")) == 2
    assert "--gen-tokens 3 is not one of the study's token counts" in capsys.readouterr().err
    assert main(_argv(tmp_path / "s3", recipe, "--generation", "--gen-cfg", "0.5")) == 2
    assert "--gen-cfg 0.5 must be >= 1" in capsys.readouterr().err
    assert main(_argv(tmp_path / "s4", recipe, "--generation", "--gen-recipe", "nope")) == 2
    assert "--gen-recipe 'nope' is neither" in capsys.readouterr().err
    # all of these are refused before any cell trains
    assert not any((tmp_path / d / "cells").exists() for d in ("s", "s2", "s3", "s4"))


def test_c4_verdict_follows_the_numbers():

    def run(fd, recon=10.0):
        return {"metric": "FD-x", "sample_fd": fd, "recon_fd": recon}

    assert judge_generation(run([10.0, 11.0]), run([20.0, 21.0]), "both", 4)["verdict"] == "holds"
    assert judge_generation(run([20.0, 21.0]), run([10.0, 11.0]), "both", 4)["verdict"] == "does not hold"
    v = judge_generation(run([10.0, 14.0]), run([12.0, 13.0]), "both", 4)
    assert v["verdict"] == "inconclusive" and v["holds"] is None and "within the spread" in v["detail"]
    assert judge_generation(run([10.0]), run([10.5]), "both", 4)["holds"] is True


def test_study_second_stage_starts_each_cell_from_the_same_cell_of_a_finished_study(tmp_path, capsys):
    torch.set_num_threads(1)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    first = tmp_path / "stage1"
    argv = ["study", "--data", "scenes", "--recipe", str(recipe), "--tokens", "2", "--modes", "both", "none",
            "--steps", "2", "--val-num", "8", "--fd-size", "32", "--no-progress"]
    assert main(argv + ["--out", str(first)]) == 0
    second = tmp_path / "stage2"
    assert main(argv + ["--out", str(second), "--init-from-study", str(first)]) == 0
    assert "starting from the weights in" in capsys.readouterr().out
    res = json.loads((second / "results.json").read_text())
    for cell in ("n2-both", "n2-none"):
        start = res["cells"][cell]["train_config"]["init_from"]
        assert start == str((first / "cells" / cell / "final").resolve())
        assert res["cell_overrides"][cell]["init_from"] == start
    assert f"every cell starts from the same cell of `{first.resolve()}`" in (second / "report.md").read_text()
    # a study without that cell, or init_from given as a shared override, is a clear error
    assert main(argv[:6] + ["4"] + argv[7:] + ["--out", str(tmp_path / "s3"), "--init-from-study", str(first)]) == 2
    assert "has no finished cell n4-both" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "s4"), f"init_from={first}"]) == 2
    assert "init_from is set per cell by the study" in capsys.readouterr().err


def test_a_field_added_later_with_its_default_does_not_invalidate_finished_cells():
    from textok.apps.study.cells import cell_changes
    from textok.train.config import TrainConfig

    new = TrainConfig().to_dict()
    old = {k: v for k, v in new.items() if k != "init_from"}  # a cell written before init_from existed
    assert cell_changes(old, new) == []
    assert cell_changes(old, {**new, "init_from": "/x/final"}) == ["init_from: '' != '/x/final'"]


def test_eval_data_scores_finished_cells_on_another_set_without_training(tmp_path, capsys):
    torch.set_num_threads(1)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from make_tiny_data import write_tiny_captioned_tar

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "study"
    argv = ["study", "--data", "scenes", "--recipe", str(recipe), "--tokens", "2", "--modes", "both", "none",
            "--steps", "2", "--val-num", "8", "--fd-size", "32", "--no-progress", "--out", str(out)]
    other = write_tiny_captioned_tar(tmp_path / "photos.tar", images=4, size=32, held_out=6)
    # before training: refused, naming what is missing
    assert main(argv + ["--eval-data", str(other)]) == 2
    assert "has no trained n2-both, n2-none" in capsys.readouterr().err
    assert main(argv) == 0
    own = {c: json.loads((out / "cells" / c / "eval.json").read_text()) for c in ("n2-both", "n2-none")}
    weights = {c: (out / "cells" / c / "final" / "model.safetensors").stat().st_mtime_ns for c in own}
    capsys.readouterr()
    assert main(argv + ["--eval-data", str(other)]) == 0
    assert "training" not in capsys.readouterr().out
    dest = out / "eval-photos"
    res = json.loads((dest / "results.json").read_text())
    assert res["evaluated_on"] == str(other.resolve()) and res["eval"]["val_num"] == 6
    assert {r["cell"] for r in res["text_reliance_table"]} == {"n2-both"}
    assert (dest / "report.md").is_file() and (dest / "grid.png").is_file()
    assert "a set the cells were not trained or tuned on" in (dest / "report.md").read_text()
    for c in own:  # the cells themselves are untouched
        assert json.loads((out / "cells" / c / "eval.json").read_text()) == own[c]
        assert (out / "cells" / c / "final" / "model.safetensors").stat().st_mtime_ns == weights[c]
        assert res["cells"][c]["metrics"]["num_images"] == 6
    # the same model on other images gives other numbers
    assert res["cells"]["n2-none"]["metrics"]["PSNR"] != own["n2-none"]["metrics"]["PSNR"]
