"""The generation pipeline: extract latents -> train a DiT / MaskGIT -> sample and decode, through the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from numerics import assert_same_maths, rounding_tolerance

from textok.cli import main
from textok.data.factory import build_dataset
from textok.data.folder import collate
from textok.errors import TextokError
from textok.generate import GenerationPipeline, LatentDataset
from textok.models.textok import TexTok, TexTokConfig
from textok.models.titok import TiTok, TiTokConfig
from textok.train.config import load_generator_config
from textok.train.generator import train_generator


NO_TEXT = ["text_in_encoder=false", "text_in_decoder=false"]
SMALL_DIT = ["model.width=32", "model.depth=1", "model.heads=2", "batch_size=8", "log_every=1",
             "optim.warmup_steps=2", "optim.lr=1e-3"]


def _save_textok(path, *overrides, seed=0):
    torch.manual_seed(seed)
    TexTok(TexTokConfig.preset("textok-tiny").override(list(overrides))).save_pretrained(path)
    return path


def _err(capsys):
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A no-text tiny TexTok, 32 scenes of latents and a DiT trained 4 steps on them, all through the CLI."""
    root = tmp_path_factory.mktemp("gen")
    tok = _save_textok(root / "tok", *NO_TEXT)
    assert main(["extract-latents", "--tokenizer", str(tok), "--num", "32", "--batch-size", "12",
                 "--out", str(root / "lat"), "--no-progress"]) == 0
    assert main(["train-generator", "--latents", str(root / "lat"), "--out", str(root / "run"), "--config", "dit-tiny",
                 "--max-steps", "4", "--no-progress", *SMALL_DIT]) == 0
    return root


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_extracted_latents_match_the_tokenizer(pipeline):
    meta = json.loads((pipeline / "lat/meta.json").read_text())
    assert (meta["count"], meta["num_tokens"], meta["channels"], meta["discrete"]) == (32, 4, 4, False)
    assert meta["num_classes"] == 8 and len(meta["shards"]) == 1
    shard = load_file(str(pipeline / "lat/shard-00000.safetensors"))
    assert shard["latents"].shape == (32, 4, 4) and shard["latents"].dtype == torch.float32
    # the stored tokens are what the tokenizer makes of the dataset's images (independent encode)
    tok = TexTok.from_pretrained(pipeline / "tok").eval()
    data = build_dataset("scenes", "train", 16, size=32)
    batch = collate([data[i] for i in range(32)])
    with torch.no_grad():
        z = tok.encode(batch["image"])
    assert_same_maths(shard["latents"], z, what="latents (batches of 12 vs 32)")
    assert torch.equal(shard["labels"], batch["label"])
    # normalisation stats = per-channel moments over every token of every image
    zd = z.double()
    assert_same_maths(torch.tensor(meta["mean"]), zd.mean(dim=(0, 1)), dtype=z.dtype, what="mean")
    assert_same_maths(torch.tensor(meta["std"]), zd.std(dim=(0, 1), unbiased=False), dtype=z.dtype, what="std")
    ds = LatentDataset(pipeline / "lat")
    # normalised: zero mean and unit (population) std per channel, relative to the latents' own scale
    assert ds.latents.double().mean(dim=(0, 1)).abs().max() <= rounding_tolerance(z.dtype) * ds.latents.abs().max()
    assert_same_maths(ds.latents.double().std(dim=(0, 1), unbiased=False), torch.ones(meta["channels"]), dtype=z.dtype)
    assert_same_maths(ds.denormalize(ds.latents), z, what="denormalised latents")
    # all captions are kept, and the bank holds each class's captions
    rows = [json.loads(line) for line in (pipeline / "lat/captions.jsonl").read_text().splitlines()]
    assert [r["captions"] for r in rows] == batch["captions"] and len(rows[0]["captions"]) > 1
    bank = json.loads((pipeline / "lat/caption_bank.json").read_text())
    label0 = int(batch["label"][0])
    assert set(batch["captions"][0]) <= set(bank["captions"][str(label0)])


def test_cli_sample_grid_and_npz(pipeline, capsys):
    gen, tok = str(pipeline / "run/final"), str(pipeline / "tok")
    assert (pipeline / "run/final/caption_bank.json").is_file()
    record = json.loads((pipeline / "run/final/config.json").read_text())
    assert record["model_type"] == "dit" and record["latents_meta"]["num_tokens"] == 4
    assert record["config"]["num_classes"] == 8 and record["config"]["in_channels"] == 4
    args = ["sample", "--generator", gen, "--tokenizer", tok, "--steps", "3", "--batch-size", "2", "--no-progress"]
    assert main(args + ["--class", "0", "3", "--n", "3", "--out", str(pipeline / "grid.png")]) == 0
    assert Image.open(pipeline / "grid.png").size == (3 * 16, 2 * 16)  # a row of 3 per class
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(args + ["--npz", str(pipeline / f"{name}.npz"), "--num", "5", "--seed", str(seed)]) == 0
    a, b, c = (np.load(pipeline / f"{n}.npz") for n in "abc")
    assert a["arr_0"].shape == (5, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == [0, 1, 2, 3, 4]  # every class in turn
    assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])
    # FID protocol: the .npz is drawn at DiT's evaluation guidance unless --cfg says otherwise, and says so;
    # the grid keeps the visualisation scale; fp32 sampling is available
    capsys.readouterr()
    assert main(args + ["--class", "1", "--n", "1", "--out", str(pipeline / "g.png"), "--npz", str(pipeline / "d.npz"),
                        "--num", "5", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "guidance 4)" in out and "guidance 1.5 (DiT's FID setting)" in out
    for name, cfg in (("e", "1.5"), ("f", "4")):
        assert main(args + ["--npz", str(pipeline / f"{name}.npz"), "--num", "5", "--seed", "1", "--cfg", cfg,
                            "--precision", "fp32"]) == 0
    e, f = (np.load(pipeline / f"{n}.npz")["arr_0"] for n in "ef")
    assert np.array_equal(e, a["arr_0"]) and not np.array_equal(f, a["arr_0"])  # a (no --cfg) was drawn at 1.5
    assert main(args + ["--npz", str(pipeline / "g.npz"), "--num", "2", "--temperature", "2"]) == 2
    assert "MaskGIT sampling options" in capsys.readouterr().err


def test_sample_refuses_bad_requests(pipeline, tmp_path, capsys):
    gen, tok = str(pipeline / "run/final"), str(pipeline / "tok")
    base = ["sample", "--generator", gen, "--tokenizer", tok, "--steps", "2", "--out", str(tmp_path / "g.png")]
    assert main(base + ["--class", "8"]) == 2
    assert "class 8 is out of range" in _err(capsys) and not (tmp_path / "g.png").exists()
    assert main(base + ["--class", "1", "--cfg", "0.5"]) == 2
    assert "must be >= 1" in _err(capsys)
    assert main(base + ["--caption", "a red circle"]) == 2
    assert "not text-to-image" in _err(capsys)
    # a tokenizer with another token count: refused, naming both shapes
    other = _save_textok(tmp_path / "tok8", *NO_TEXT, "num_tokens=8")
    assert main(["sample", "--generator", gen, "--tokenizer", str(other), "--out", str(tmp_path / "g.png")]) == 2
    err = _err(capsys)
    assert "(4, 4)" in err and "(8, 4)" in err


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_resume_is_bit_exact(pipeline, tmp_path):
    """2N steps in one run == N steps, stop, then the same command resumed to 2N."""
    lat = str(pipeline / "lat")
    over = [f"latents={lat}", *SMALL_DIT, "ckpt_every=3", "ema_decay=0.9"]
    full = load_generator_config("dit-tiny", over + ["max_steps=6"])
    train_generator(full, tmp_path / "a", progress=False)
    train_generator(load_generator_config("dit-tiny", over + ["max_steps=3"]), tmp_path / "b", progress=False)
    train_generator(full, tmp_path / "b", progress=False)
    for part in ("model", "ema", "opt"):
        a = load_file(str(tmp_path / "a/checkpoints/step-0000006" / f"{part}.safetensors"))
        b = load_file(str(tmp_path / "b/checkpoints/step-0000006" / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    fa = load_file(str(tmp_path / "a/final/model.safetensors"))
    fb = load_file(str(tmp_path / "b/final/model.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert float(fa["final_layer.linear.weight"].abs().sum()) > 0  # zero at init: training really moved it
    steps = [json.loads(l)["step"] for l in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_trained_generator_follows_its_class(tmp_path):
    """Latents where class k is a fixed token pattern (+ small noise): after a short training run, samples of
    class k land nearest pattern k (checks normalisation, class conditioning, CFG and un-normalisation)."""
    from safetensors.torch import save_file

    from textok.diffusion import DiffusionConfig, create_diffusion
    from textok.models.registry import load_generator

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    K, M, N, C = 4, 256, 4, 4
    patterns = torch.randn(K, N, C, generator=g) * 2 + 3  # far from zero mean / unit std: normalisation matters
    labels = torch.arange(M) % K
    lat = patterns[labels] + 0.1 * torch.randn(M, N, C, generator=g)
    d = tmp_path / "lat"
    d.mkdir()
    save_file({"latents": lat, "labels": labels, "index": torch.arange(M)}, str(d / "shard-00000.safetensors"))
    (d / "captions.jsonl").write_text("".join(json.dumps({"index": i, "captions": ["x"]}) + "\n" for i in range(M)))
    (d / "meta.json").write_text(json.dumps({
        "tokenizer_dir": "", "tokenizer_type": "textok", "num_tokens": N, "channels": C, "discrete": False,
        "codebook_size": 0, "count": M, "shards": [M], "num_classes": K, "text_encoder": "",
        "mean": lat.mean((0, 1)).tolist(), "std": lat.std((0, 1)).tolist()}))
    cfg = load_generator_config("dit-tiny", [f"latents={d}", "model.width=64", "model.depth=2", "batch_size=32",
                                             "max_steps=300", "optim.lr=1e-3", "optim.warmup_steps=20",
                                             "ema_decay=0.9", "log_every=100", "diffusion=flow"])
    model, record = load_generator(train_generator(cfg, tmp_path / "run", progress=False))
    diffusion = create_diffusion(DiffusionConfig.from_dict(record["diffusion"]))
    y = torch.arange(K).repeat(8)
    z = diffusion.sample(model.eval(), (len(y), N, C), steps=25, cfg_scale=2.0, model_kwargs={"y": y},
                         generator=torch.Generator().manual_seed(0))
    meta = record["latents_meta"]
    z = z * torch.tensor(meta["std"]) + torch.tensor(meta["mean"])
    nearest = ((z[:, None] - patterns[None]) ** 2).mean((2, 3)).argmin(1)
    assert float((nearest == y).float().mean()) >= 0.9


def test_nan_loss_stops_clearly(pipeline, tmp_path, monkeypatch):
    from textok.diffusion.gaussian import GaussianDiffusion

    real = GaussianDiffusion.training_loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        if calls["n"] >= 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_loss", poisoned)
    cfg = load_generator_config("dit-tiny", [f"latents={pipeline / 'lat'}", *SMALL_DIT, "max_steps=4",
                                             "ckpt_every=2"])
    with pytest.raises(TextokError, match="NaN/inf by step 3.*step-0000002.*intact"):
        train_generator(cfg, tmp_path, progress=False)


def test_maskgit_on_titok_codes(pipeline, tmp_path, capsys):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    TiTok(TiTokConfig.preset("titok-tiny")).save_pretrained(tmp_path / "titok")
    assert main(["extract-latents", "--tokenizer", str(tmp_path / "titok"), "--num", "16", "--out",
                 str(tmp_path / "lat"), "--no-progress"]) == 0
    shard = load_file(str(tmp_path / "lat/shard-00000.safetensors"))
    assert shard["codes"].dtype == torch.int16 and shard["codes"].shape == (16, 4)  # 64 codes fit int16
    assert int(shard["codes"].min()) >= 0 and int(shard["codes"].max()) < 64
    assert main(["train-generator", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "run"),
                 "--config", "maskgit-tiny", "--max-steps", "2", "--no-progress", "batch_size=8",
                 "model.transformer.width=32", "model.transformer.depth=1", "model.transformer.heads=2"]) == 0
    record = json.loads((tmp_path / "run/final/config.json").read_text())
    assert record["model_type"] == "maskgit" and record["config"]["codebook_size"] == 64
    assert record["config"]["num_tokens"] == 4 and record["config"]["num_classes"] == 8
    assert main(["sample", "--generator", str(tmp_path / "run/final"), "--tokenizer", str(tmp_path / "titok"),
                 "--class", "2", "--n", "2", "--steps", "3", "--out", str(tmp_path / "g.png"),
                 "--npz", str(tmp_path / "s.npz"), "--num", "3", "--no-progress"]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 16, 16, 3)
    # MaskGIT on continuous tokens, and a MaskGIT with a TexTok tokenizer: both refused clearly
    assert main(["train-generator", "--latents", str(pipeline / "lat"), "--out", str(tmp_path / "bad"),
                 "--kind", "maskgit", "--config", "maskgit-tiny", "--max-steps", "1", "--no-progress"]) == 2
    assert "MaskGIT needs discrete codes" in _err(capsys)
    assert main(["sample", "--generator", str(tmp_path / "run/final"), "--tokenizer", str(pipeline / "tok"),
                 "--class", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "continuous tokens" in _err(capsys)


def test_npz_samples_in_fp32_by_default(pipeline, tmp_path, monkeypatch, capsys):
    """FID samples (`sample --npz`) are drawn in fp32 unless --precision says otherwise (DiT's FID sampler);
    the grid keeps "auto" (bf16 autocast on a GPU)."""
    seen: list[tuple[int, str]] = []
    real = GenerationPipeline.generate

    def spy(self, *args, **kwargs):
        seen.append((kwargs.get("n") or 0, kwargs["precision"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationPipeline, "generate", spy)
    gen, tok = str(pipeline / "run/final"), str(pipeline / "tok")
    base = ["sample", "--generator", gen, "--tokenizer", tok, "--steps", "2", "--class", "1", "--no-progress"]
    assert main([*base, "--n", "2", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"),
                 "--num", "3"]) == 0
    assert seen == [(2, "auto"), (3, "fp32")]
    assert "in fp32" in capsys.readouterr().out
    seen.clear()
    assert main([*base, "--npz", str(tmp_path / "b.npz"), "--num", "3", "--precision", "bf16"]) == 0
    assert seen == [(3, "bf16")]
    help_text = " ".join(_help(["sample", "--help"]).split())
    assert "fp32 for --npz" in help_text


def _help(argv) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


def test_maskgit_sampling_defaults_come_from_the_saved_generator(tmp_path, monkeypatch):
    """`sample` draws a MaskGIT with the sampler stored in its config (TiTok's per-model settings), not one
    sampler for every model: steps, guidance and the rest reach MaskGIT.generate from the saved config."""
    from textok.models.maskgit import MaskGIT, MaskGITConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    TiTok(TiTokConfig.preset("titok-tiny")).save_pretrained(tmp_path / "titok")
    assert main(["extract-latents", "--tokenizer", str(tmp_path / "titok"), "--num", "16", "--out",
                 str(tmp_path / "lat"), "--no-progress"]) == 0
    assert main(["train-generator", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "run"),
                 "--config", "maskgit-b-128", "--max-steps", "1", "--no-progress", "batch_size=8",
                 "model.transformer.width=32", "model.transformer.depth=1", "model.transformer.heads=2"]) == 0
    record = json.loads((tmp_path / "run/final/config.json").read_text())
    assert record["config"]["sampler"] == MaskGITConfig.preset("maskgit-b-128").sampler.to_dict()
    calls: list[int] = []
    real = MaskGIT.forward
    monkeypatch.setattr(MaskGIT, "forward", lambda self, ids, labels: calls.append(ids.shape[0]) or real(self, ids, labels))
    pipe = GenerationPipeline(tmp_path / "run/final", tmp_path / "titok")
    assert pipe.default_cfg() == pipe.default_cfg(for_eval=True) == 6.9
    pipe.generate([0, 1], seed=0)
    assert len(calls) == 64 and all(b == 4 for b in calls[1:])  # S-128's 64 steps, guided after the first


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.filterwarnings("ignore:a caption has")
def test_text_tokenizer_and_text_to_image(tiny_t5_dir, tmp_path):
    """A text tokenizer: latents encoded with the first caption; class samples decode with bank captions;
    a text-to-image DiT on the same latents samples from a prompt."""
    torch.set_num_threads(1)
    tok = _save_textok(tmp_path / "tok", f"text_encoder=t5:{tiny_t5_dir}", "text_dim=32")
    from textok.generate import extract_latents

    extract_latents(tok, "scenes", tmp_path / "lat", num=16, progress=False)
    shard = load_file(str(tmp_path / "lat/shard-00000.safetensors"))
    model = TexTok.from_pretrained(tok).eval()
    data = build_dataset("scenes", "train", 16, size=16)
    batch = collate([data[i] for i in range(4)])
    with torch.no_grad():
        z = model.encode(batch["image"], [c[0] for c in batch["captions"]])
    assert_same_maths(shard["latents"][:4], z, what="latents (batch of 16 vs 4)")

    common = [f"latents={tmp_path / 'lat'}", *SMALL_DIT, "max_steps=2"]
    train_generator(load_generator_config("dit-tiny", common), tmp_path / "cls", progress=False)
    pipe = GenerationPipeline(tmp_path / "cls/final", tok)
    caps = pipe.decoder_captions([3, 5], None, seed=7, first=0, batch=2)
    assert caps[0] in pipe.bank.captions[3] and caps[1] in pipe.bank.captions[5]
    assert caps == pipe.decoder_captions([3, 5], None, seed=7, first=0, batch=2)
    images = pipe.generate([3, 5], steps=2, cfg_scale=2.0, seed=0)
    assert images.shape == (2, 3, 16, 16) and bool(images.abs().le(1).all())

    train_generator(load_generator_config("dit-tiny", common + ["text=true"]), tmp_path / "t2i", progress=False)
    pipe = GenerationPipeline(tmp_path / "t2i/final", tok)
    assert pipe.is_text_to_image and pipe.model.config.text_dim == 32 and pipe.num_classes == 0
    a = pipe.generate(prompts=["a red circle", "a blue square"], steps=2, seed=3)
    b = pipe.generate(prompts=["a red circle", "a blue square"], steps=2, seed=3)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    with pytest.raises(TextokError, match="empty prompt"):
        pipe.generate(prompts=["  "], steps=2)
    with pytest.raises(TextokError, match="text-to-image"):
        pipe.generate([1], steps=2)


def test_demo_gen_quick(pipeline, tmp_path, capsys):
    assert main(["demo-gen", "--tokenizer", str(pipeline / "tok"), "--out", str(tmp_path), "--quick"]) == 0
    assert Image.open(tmp_path / "samples.png").size == (2 * 16, 8 * 16)  # a row of 2 per class, 8 classes
    assert Image.open(tmp_path / "reference.png").size == (2 * 16, 8 * 16)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"]["0"] == "circle" and str(tmp_path / "samples.png") in capsys.readouterr().out
    assert main(["demo-gen", "--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "run `textok demo`" in _err(capsys)


def _sample_worker(rank, world, port, argv, threads):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)  # the single process's count: bit equality holds for one thread count
    assert main(argv) == 0


@pytest.mark.slow
def test_sample_npz_under_two_processes_equals_one_process(pipeline):
    """`textok sample --npz` under torchrun: each process draws every other batch, rank 0 joins them in order;
    the file equals a single process's, bit for bit (batches are seeded by their global first index)."""
    import socket

    import torch.multiprocessing as mp

    args = ["sample", "--generator", str(pipeline / "run/final"), "--tokenizer", str(pipeline / "tok"), "--steps", "2",
            "--batch-size", "2", "--num", "7", "--seed", "3", "--no-progress", "--device", "cpu"]
    assert main(args + ["--npz", str(pipeline / "one.npz")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sample_worker, args=(2, port, args + ["--npz", str(pipeline / "two.npz")], torch.get_num_threads()),
                       nprocs=2, start_method="spawn")
    one, two = np.load(pipeline / "one.npz"), np.load(pipeline / "two.npz")
    assert two["arr_0"].shape == (7, 16, 16, 3)
    assert np.array_equal(one["arr_0"], two["arr_0"]) and one["arr_1"].tolist() == two["arr_1"].tolist()
    assert not list(pipeline.glob(".two.npz.parts*"))  # the part files are cleaned up


def test_class_conditional_decoder_captions_exclude_the_reference_images_own():
    """The paper's protocol: a sample standing for a reference image is decoded with a caption of its class that
    is not one of that image's own captions (whatever the seed)."""
    import types

    from textok.generate.sampling import GenerationPipeline
    from textok.text.banks import CaptionBank

    fake = types.SimpleNamespace(decoder_needs_text=True,
                                 bank=CaptionBank({0: ["red petals", "yellow centre", "long stem"], 1: ["blue"]}))
    own = [{"red petals", "yellow centre"}, {"blue"}]
    for seed in range(20):
        caps = GenerationPipeline.decoder_captions(fake, [0, 1], None, seed, 0, 2, exclude=own)
        assert caps[0] == "long stem"  # the only caption of class 0 that is not the image's own
        assert caps[1] == "blue"  # nothing else in the class: the bank's own caption rather than none
    drawn = {GenerationPipeline.decoder_captions(fake, [0], None, s, 0, 1)[0] for s in range(40)}
    assert drawn == {"red petals", "yellow centre", "long stem"}  # without exclusions, any caption of the class
