"""ImageFolder through the commands: train-tokenizer -> extract-latents (codes (M, P, L)) -> train-generator
--kind var -> sample, all through the CLI; layouts that do not match are refused naming both; a VAR run resumes
bit for bit."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from textok.cli import main
from textok.data.factory import build_dataset
from textok.data.folder import collate
from textok.generate import LatentDataset
from textok.models.imagefolder import ImageFolder, ImageFolderConfig
from textok.models.registry import load_generator
from textok.models.titok import TiTok, TiTokConfig
from textok.train.config import load_generator_config
from textok.train.generator import train_generator

TOK_ARGS = ["batch_size=4", "data.train_size=16", "data.val_size=4", "log_every=1", "sample_every=0", "ckpt_every=2",
            "optim.warmup_steps=1", "loss.perceptual=none"]
GEN_ARGS = ["batch_size=8", "log_every=1", "optim.warmup_steps=1", "optim.lr=1e-3", "model.width=32", "model.depth=1",
            "model.heads=2"]
CODES_PER_BRANCH = 1 + 4 + 9  # imagefolder-tiny: scales 1, 2, 3


def _err(capsys):
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny ImageFolder trained 2 steps, the codes of 24 scenes, a VAR trained 3 steps: all by the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("if")
    assert main(["train-tokenizer", "--config", "imagefolder-tiny", "--out", str(root / "tok"), "--max-steps", "2",
                 "--no-progress", *TOK_ARGS]) == 0
    assert main(["extract-latents", "--tokenizer", str(root / "tok/final"), "--num", "24", "--batch-size", "10",
                 "--out", str(root / "lat"), "--no-progress"]) == 0
    assert main(["train-generator", "--latents", str(root / "lat"), "--out", str(root / "var"), "--kind", "var",
                 "--config", "var-tiny", "--max-steps", "3", "--no-progress", *GEN_ARGS]) == 0
    return root


def test_extracted_codes_are_the_tokenizers_codes_per_branch(run):
    meta = json.loads((run / "lat/meta.json").read_text())
    assert meta["discrete"] and meta["tokenizer_type"] == "imagefolder" and meta["code_shape"] == [2, CODES_PER_BRANCH]
    assert meta["code_layout"] == {"scales": [1, 2, 3], "branches": 2, "codebook_size": 64, "code_dim": 8}
    assert meta["tokenizer_config"] == ImageFolder.read_config(run / "tok/final").to_dict()
    shard = load_file(str(run / "lat/shard-00000.safetensors"))
    assert shard["codes"].dtype == torch.int16 and shard["codes"].shape == (24, 2, CODES_PER_BRANCH)
    tok = ImageFolder.from_pretrained(run / "tok/final").eval()
    batch = collate([build_dataset("scenes", "train", 16, size=24)[i] for i in range(24)])
    codes = tok.encode_codes(batch["image"])
    assert torch.equal(shard["codes"].long(), codes) and torch.equal(shard["labels"], batch["label"])
    # the stored tokens are f_hat of all scales, rebuilt from those codes (batches of 10 vs 24: same maths)
    torch.testing.assert_close(shard["latents"], tok.fhat_from_codes(codes), rtol=1e-5, atol=1e-5)
    assert LatentDataset(run / "lat").codes.dtype == torch.int64


def test_var_is_trained_by_the_generator_loop_on_the_codes(run):
    log = [json.loads(line) for line in (run / "var/log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(e["loss"] > 0 and "metric/ce_b0" in e and "metric/ce_b1" in e for e in log)
    # the logged loss is the mean of the branch cross-entropies (the folded loss)
    assert all(abs(e["loss"] - (e["metric/ce_b0"] + e["metric/ce_b1"]) / 2) < 1e-5 for e in log)
    model, record = load_generator(run / "var/final")
    assert record["model_type"] == "var" and model.config.fold and model.config.num_classes == 8
    assert model.config.scales == (1, 2, 3) and model.config.codebook_size == 64 and model.config.width == 32
    assert record["latents_meta"]["code_shape"] == [2, CODES_PER_BRANCH]


def test_training_inputs_are_the_tokenizers_teacher_forcing_inputs(run, tmp_path):
    """Step 1's logged loss equals the VAR's loss on the tokenizer's own teacher-forcing inputs, computed here
    independently, with the label drop the step drew (no dropout: class_dropout=0)."""
    over = [f"latents={run / 'lat'}", *GEN_ARGS, "max_steps=1", "model.class_dropout=0", "batch_size=24",
            "ema_decay=0"]
    cfg = load_generator_config("var-tiny", over)
    torch.manual_seed(cfg.seed)
    from textok.train.generator import VARTask
    from textok.distributed import DistInfo

    task = VARTask(cfg, tmp_path / "x", DistInfo(), progress=False)
    torch.manual_seed(cfg.seed)  # as the loop seeds before it makes the model
    initial = {k: v.clone() for k, v in task.make_model().state_dict().items()}
    train_generator(cfg, tmp_path / "run", progress=False)
    first = json.loads((tmp_path / "run/log.jsonl").read_text().splitlines()[0])
    tok = ImageFolder.from_pretrained(run / "tok/final").eval()
    data = LatentDataset(run / "lat")
    model = task.make_model()
    model.load_state_dict(initial)
    with torch.no_grad():
        terms = model.training_loss(data.codes, tok.teacher_forcing_inputs(data.codes), data.labels.clamp_min(0),
                                    drop=torch.zeros(24, dtype=torch.bool))
    assert abs(float(terms["loss"]) - first["loss"]) < 1e-5


def test_sample_grid_and_npz_from_a_var(run, capsys):
    args = ["sample", "--generator", str(run / "var/final"), "--batch-size", "3", "--no-progress"]
    assert main(args + ["--class", "0", "5", "--n", "3", "--out", str(run / "grid.png"), "--top-k", "10"]) == 0
    assert Image.open(run / "grid.png").size == (3 * 16, 2 * 16)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(args + ["--npz", str(run / f"{name}.npz"), "--num", "5", "--seed", str(seed), "--cfg", "2",
                            "--top-p", "0.9"]) == 0
    a, b, c = (np.load(run / f"{n}.npz") for n in "abc")
    assert a["arr_0"].shape == (5, 16, 16, 3) and a["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])
    capsys.readouterr()
    assert main(args + ["--npz", str(run / "d.npz"), "--num", "2"]) == 0
    assert "guidance 4.25 (its stored sampler)" in capsys.readouterr().out
    assert main(args + ["--npz", str(run / "e.npz"), "--num", "2", "--temperature", "2"]) == 2
    assert "MaskGIT sampling options; a VAR samples with --cfg, --top-k and --top-p" in _err(capsys)
    assert main(args + ["--npz", str(run / "e.npz"), "--num", "2", "--steps", "8"]) == 2
    assert "one step per scale (3)" in _err(capsys)


def test_mismatched_layouts_are_refused_naming_both(run, tmp_path, capsys):
    lat, tok = str(run / "lat"), str(run / "tok/final")
    # a generator layout chosen on the command line that is not the tokenizer's
    assert main(["train-generator", "--latents", lat, "--out", str(tmp_path / "g"), "--kind", "var", "--config",
                 "var-tiny", "--max-steps", "1", "--no-progress", *GEN_ARGS, "model.scales=[1,3]"]) == 2
    err = _err(capsys)
    assert "generator models scales [1, 3]" in err and "the tokenizer makes scales [1, 2, 3]" in err
    assert tok in err and "drop model scales" in err and err.count("\n") == 1
    assert not (tmp_path / "g").exists()
    # sampling with a tokenizer of another codebook: refused, naming both
    torch.manual_seed(0)
    other = ImageFolder(ImageFolderConfig.preset("imagefolder-tiny").override(["quantizer.num_codes=32"]))
    other.save_pretrained(tmp_path / "tok32")
    assert main(["sample", "--generator", str(run / "var/final"), "--tokenizer", str(tmp_path / "tok32"), "--out",
                 str(tmp_path / "s.png")]) == 2
    err = _err(capsys)
    assert "of 64 codes" in err and "of 32 codes" in err and str(tmp_path / "tok32") in err
    assert not (tmp_path / "s.png").exists()
    # MaskGIT cannot model (P, L) codes; VAR cannot model a TiTok's flat codes
    assert main(["train-generator", "--latents", lat, "--out", str(tmp_path / "m"), "--config", "maskgit-tiny",
                 "--max-steps", "1", "--no-progress"]) == 2
    assert "train a VAR on them (--kind var)" in _err(capsys)
    torch.manual_seed(0)
    TiTok(TiTokConfig.preset("titok-tiny")).save_pretrained(tmp_path / "titok")
    assert main(["extract-latents", "--tokenizer", str(tmp_path / "titok"), "--num", "8", "--out",
                 str(tmp_path / "tlat"), "--no-progress"]) == 0
    assert main(["train-generator", "--latents", str(tmp_path / "tlat"), "--out", str(tmp_path / "v"), "--kind", "var",
                 "--config", "var-tiny", "--max-steps", "1", "--no-progress"]) == 2
    assert "VAR needs the multi-scale codes of an ImageFolder" in _err(capsys)


def test_a_changed_tokenizer_is_refused(run, tmp_path, capsys):
    import shutil

    shutil.copytree(run / "tok/final", tmp_path / "tok")
    assert main(["extract-latents", "--tokenizer", str(tmp_path / "tok"), "--num", "8", "--out", str(tmp_path / "lat"),
                 "--no-progress"]) == 0
    torch.manual_seed(1)
    ImageFolder(ImageFolderConfig.preset("imagefolder-tiny")).save_pretrained(tmp_path / "tok")  # retrained in place
    assert main(["train-generator", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "g"), "--kind", "var",
                 "--config", "var-tiny", "--max-steps", "1", "--no-progress", *GEN_ARGS]) == 2
    assert "changed since" in _err(capsys)


def test_var_resume_is_bit_exact(run, tmp_path):
    """6 steps in one run == 3 steps, stop, then the same command resumed to 6 (label drops included). Warm-up
    covers steps 0-2, so the first 3 steps' learning rates do not depend on max_steps."""
    over = [f"latents={run / 'lat'}", *GEN_ARGS, "optim.warmup_steps=3", "ckpt_every=3", "ema_decay=0.9",
            "model.class_dropout=0.5"]
    full = load_generator_config("var-tiny", over + ["max_steps=6"])
    train_generator(full, tmp_path / "a", progress=False)
    train_generator(load_generator_config("var-tiny", over + ["max_steps=3"]), tmp_path / "b", progress=False)
    train_generator(full, tmp_path / "b", progress=False)
    for part in ("model", "ema", "opt"):
        a = load_file(str(tmp_path / "a/checkpoints/step-0000006" / f"{part}.safetensors"))
        b = load_file(str(tmp_path / "b/checkpoints/step-0000006" / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a, b = load_file(str(tmp_path / "a/final/model.safetensors")), load_file(str(tmp_path / "b/final/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = load_file(str(run / "var/final/model.safetensors"))
    assert not torch.equal(a["head.weight"], init["head.weight"])  # training moved it
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_demo_imagefolder_quick_run(tmp_path, monkeypatch):
    """`textok demo-imagefolder --quick` writes its pictures and metrics; the numbers come from the runs: the
    prefix PSNRs are of real decodings, the usage table covers every branch and scale, and the held-out VAR loss
    is the saved generator's."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # no runs/demo here: the table has ImageFolder alone
    assert main(["demo-imagefolder", "--out", "out", "--quick"]) == 0
    out = tmp_path / "out"
    for name in ("reconstructions.png", "samples.png", "metrics.json", "report.md", "var/final/config.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["prefix_psnr"]) == 4 and all(math_ok(v) for v in m["prefix_psnr"].values())
    assert m["usage_per_scale"]["scales"] == [1, 2, 3, 4] and len(m["usage_per_scale"]["per_scale"][0]) == 2
    assert all(0 < u <= 1 for row in m["usage_per_scale"]["per_scale"] for u in row)
    assert m["imagefolder"]["PSNR"] > 0 and "no comparison" in m["comparison"]["note"]
    from textok.apps.demos.imagefolder import heldout_var_loss

    again = heldout_var_loss(out / "var/final", out / "val-latents")
    assert again["loss"] == m["var"]["heldout"]["loss"] and 0 < again["loss"] < 2 * again["chance_loss"]


def math_ok(v):
    return isinstance(v, float) and 0 < v < 100
