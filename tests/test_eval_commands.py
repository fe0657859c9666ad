"""`textok eval reconstruction|generation`, the library functions behind them, and build_dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from numerics import fd_tolerance, rounding_tolerance

from textok.cli import main
from textok.data import CaptionedScenes, ImageCaptionFolder, collate
from textok.data.factory import FirstCaptions, build_dataset
from textok.errors import TextokError
from textok.eval.fid import GaussianStats, frechet_distance
from textok.eval.generation import evaluate_samples, iter_image_dir, iter_npz, iter_samples
from textok.eval.reconstruction import evaluate_tokenizer, reconstruct_batches


# ----------------------------------------------------------------------------------------------- helpers
class Identity(nn.Module):
    """A 'tokenizer' that reconstructs perfectly."""

    class config:  # noqa: N801 - mimics model.config
        uses_text = False
        image_size = 16

    def forward(self, x: torch.Tensor, text=None):
        return x, x


class Darken(Identity):
    """A deterministic imperfect 'tokenizer' that takes text (checks the first caption is what it gets)."""

    class config:  # noqa: N801
        uses_text = True
        image_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def forward(self, x, text=None):
        assert isinstance(text, list) and len(text) == x.shape[0]
        self.seen.extend(text)
        return x * 0.8 - 0.1, x


class Toy(nn.Module):
    """A tiny fixed feature extractor (4x4 average pool -> random projection to ``dim``), in float64 so that its
    features do not depend on the batch they are computed in (the tests compare batch sizes at float64 precision)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.name = f"toy{dim}"
        self.proj = nn.Linear(48, dim, dtype=torch.float64)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(dim))

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(x.double(), 4).flatten(1))


def scenes_images(n: int, size: int = 16) -> torch.Tensor:
    data = CaptionedScenes(size, "val", size=n)
    return collate([data[i] for i in range(n)])["image"]


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from textok import TexTok, TexTokConfig

    torch.manual_seed(0)
    cfg = TexTokConfig.preset("textok-tiny").override(["text_in_encoder=false", "text_in_decoder=false"])
    d = tmp_path_factory.mktemp("tok") / "model"
    TexTok(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory) -> Path:
    """Random Inception weights as .safetensors (no hash check): exercises the rFID/gFID/IS code paths only."""
    from safetensors.torch import save_file

    from textok.nets.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    p = tmp_path_factory.mktemp("inc") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p))
    return p


# ----------------------------------------------------------------------------------------------- datasets
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_build_dataset_scenes_and_caption_limit() -> None:
    d = build_dataset("scenes", "val", 16, size=5)
    assert isinstance(d, CaptionedScenes) and len(d) == 5 and d[0]["image"].shape == (3, 16, 16)
    assert len(build_dataset("scenes", "train", 16)) == 4000  # size 0 = the default
    assert len(build_dataset("scenes", "dev", 16, size=3)) == 3  # dev is an alias of val
    lim = build_dataset("scenes", "val", 16, size=5, captions_per_image=2)
    assert isinstance(lim, FirstCaptions) and len(lim) == 5
    assert lim[1]["captions"] == d[1]["captions"][:2] and len(d[1]["captions"]) == 5
    assert torch.equal(lim[1]["image"], d[1]["image"]) and lim.image_size == 16
    bank = lim.caption_bank()
    assert sum(len(v) for v in bank.values()) == 10
    other = build_dataset("scenes", "val", 16, size=5, seed=1)
    assert not torch.equal(other[0]["image"], d[0]["image"])


def test_build_dataset_folder(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (20, 24), (10 * i, 50, 90)).save(tmp_path / f"{i}.png")
    rows = [{"file": f"{i}.png", "captions": [f"cap {i} a", f"cap {i} b"]} for i in range(4)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = build_dataset(str(tmp_path), "train", 16, size=3, captions_per_image=1)
    assert isinstance(d.dataset, ImageCaptionFolder) and len(d) == 3
    assert d[2]["captions"] == ["cap 2 a"] and d[2]["image"].shape == (3, 16, 16)
    assert len(build_dataset(str(tmp_path), "train", 16)) == 4
    with pytest.raises(TextokError, match="neither 'scenes'"):
        build_dataset(str(tmp_path / "nope"), "train", 16)
    with pytest.raises(TextokError, match="image folders"):
        build_dataset("scenes", "val", 16, caption_bank="bank.json")


# ----------------------------------------------------------------------------------------------- reconstruction
def test_cli_reconstruction_tiny_model(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = main(["eval", "reconstruction", "--model", str(tiny_model_dir), "--data", "scenes", "--num", "8",
               "--fd-size", "32", "--batch-size", "3", "--quiet", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 8
    for key in ("PSNR", "SSIM", "FD-opennsfw@32"):
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
    assert "rFID" not in res and "FID" not in res and "LPIPS" not in res
    assert "Inception" in res["skipped"]["rFID"] and "VGG16" in res["skipped"]["LPIPS"]
    assert "not FID" in res["metric_notes"]["FD-opennsfw@32"]
    assert 0 < res["PSNR"] < 40 and -1 <= res["SSIM"] <= 1 and res["FD-opennsfw@32"] > 0  # untrained model
    assert res["settings"]["split"] == "val"
    printed = capsys.readouterr().out
    assert "FD-opennsfw@32" in printed and "skipped rFID" in printed


def test_cli_reconstruction_prints_its_estimated_time(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """One estimated-time line, also with --quiet (no progress bar): 56 one-image batches are enough to time."""
    rc = main(["eval", "reconstruction", "--model", str(tiny_model_dir), "--data", "scenes", "--num", "56",
               "--fd-size", "32", "--batch-size", "1", "--quiet", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "about" in line]
    assert len(lines) == 1 and lines[0].startswith("eval reconstruction: about") and "batches left of 56" in lines[0]


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_identity_tokenizer_is_perfect() -> None:
    data = CaptionedScenes(16, "val", size=10)
    res = evaluate_tokenizer(Identity(), data, num=10, batch_size=4, fd_size=32, progress=False)
    assert res["PSNR"] == math.inf
    assert res["SSIM"] == pytest.approx(1.0, abs=1e-12)
    assert abs(res["FD-opennsfw@32"]) < 1e-6


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_first_caption_and_streaming_equals_all_at_once() -> None:
    data = CaptionedScenes(16, "val", size=12)
    toy_small, toy_big = Toy(6), Toy(32)  # 12 > 6 dims: sqrtm route; 12 < 32: low-rank route
    model = Darken()
    runs = [evaluate_tokenizer(model, data, num=11, batch_size=bs, fd_networks=(toy_small, toy_big),
                               progress=False) for bs in (3, 11)]
    assert model.seen[:11] == [data[i]["captions"][0] for i in range(11)]
    for k in ("PSNR", "SSIM", "FD-toy6", "FD-toy32"):
        assert runs[0][k] == pytest.approx(runs[1][k], rel=rounding_tolerance(np.float64)), k
    # All at once, independently: the first 11 images, the same darkening and 8-bit rounding, numpy stats.
    x = collate([data[i] for i in range(11)])["image"]
    r = torch.round(((x * 0.8 - 0.1).clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    mse = ((r.double() - x.double()) ** 2).flatten(1).mean(1)
    assert runs[0]["PSNR"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=rounding_tolerance(np.float64))
    with torch.no_grad():
        for toy in (toy_small, toy_big):
            fa, fb = toy(x).double().numpy(), toy(r).double().numpy()
            want = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
            assert runs[0][f"FD-{toy.name}"] == pytest.approx(want, abs=fd_tolerance(fa, fb)), toy.name
    # reconstruct_batches: deterministic order, clamped, 8-bit levels
    got = list(reconstruct_batches(model, data, num=5, batch_size=2))
    assert [b[0].shape[0] for b in got] == [2, 2, 1]
    assert torch.equal(torch.cat([b[0] for b in got]), x[:5])


def test_rfid_with_inception_weights(tmp_path: Path, fake_inception: Path) -> None:
    data = CaptionedScenes(16, "val", size=6)
    res = evaluate_tokenizer(Identity(), data, batch_size=6, fd_networks=(), inception_weights=str(fake_inception),
                             progress=False)
    assert "rFID" in res and abs(res["rFID"]) < 1e-6 and "rFID" not in res["skipped"]


def test_missing_inception_weights_is_one_line_exit_2(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.pth"
    rc = main(["eval", "reconstruction", "--model", str(tiny_model_dir), "--num", "4", "--fd-size", "32",
               "--quiet", "--inception-weights", str(missing)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not found" in err and "nope.pth" in err
    np.savez(tmp_path / "s.npz", np.zeros((4, 16, 16, 3), np.uint8))
    rc = main(["eval", "generation", "--samples", str(tmp_path / "s.npz"), "--ref", "scenes", "--quiet",
               "--inception-weights", str(missing)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Inception" in err
    rc = main(["eval", "reconstruction", "--quiet"])
    assert rc == 2 and "--model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- generation
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_cli_generation_npz_vs_dataset_then_saved_stats(tmp_path: Path) -> None:
    imgs = scenes_images(12)
    np.savez(tmp_path / "samples.npz", to_uint8_nhwc(imgs))  # uint8 NHWC, like ADM/DiT
    common = ["--fd-size", "32", "--batch-size", "5", "--quiet"]
    rc = main(["eval", "generation", "--samples", str(tmp_path / "samples.npz"), "--ref", "scenes", "--split", "val",
               "--ref-num", "12", "--save-ref-stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "a.json"),
               *common])
    assert rc == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["num_samples"] == 12 and a["num_reference"] == 12 and a["image_size"] == 16
    assert abs(a["FD-opennsfw@32"]) < 1e-6  # the samples are the reference images
    assert "gFID" not in a and "IS" not in a and set(a["skipped"]) == {"gFID", "IS"}
    ref = GaussianStats.load(tmp_path / "ref.npz")
    assert ref.feature == "opennsfw@32" and ref.num_samples == 12 and ref.mu.shape == (1024,)
    # The first 8 samples against the saved statistics == against the images directly.
    rc = main(["eval", "generation", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
               "--num", "8", "--out", str(tmp_path / "b.json"), *common])
    assert rc == 0
    b = json.loads((tmp_path / "b.json").read_text())
    direct = evaluate_samples(imgs[:8], imgs, fd_size=32, progress=False)
    assert b["num_samples"] == 8 and b["FD-opennsfw@32"] > 1.0
    # the two routes see float32 features computed in batches of different sizes
    assert b["FD-opennsfw@32"] == pytest.approx(direct["FD-opennsfw@32"], rel=rounding_tolerance(np.float32))


def test_reference_stats_of_another_network_are_refused(tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "s.npz", to_uint8_nhwc(scenes_images(4)))
    np.savez(tmp_path / "pytorch_fid.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # no feature key: Inception
    rc = main(["eval", "generation", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "pytorch_fid.npz"),
               "--fd-size", "32", "--quiet"])
    assert rc == 2 and "--inception-weights" in capsys.readouterr().err
    GaussianStats(np.zeros(1024), np.eye(1024), 10, "opennsfw").save(tmp_path / "other.npz")
    with pytest.raises(TextokError, match="opennsfw@32"):
        evaluate_samples(str(tmp_path / "s.npz"), str(tmp_path / "other.npz"), fd_size=32, progress=False)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_sample_readers_convert_modes_and_sizes(tmp_path: Path) -> None:
    from PIL import Image

    imgs = scenes_images(4)
    u8 = to_uint8_nhwc(imgs)
    np.savez(tmp_path / "s.npz", u8)
    from_npz = torch.cat(list(iter_npz(tmp_path / "s.npz", batch_size=3)))
    assert torch.equal(from_npz, imgs)
    assert torch.equal(torch.cat(list(iter_samples(u8, batch_size=2, limit=3))), imgs[:3])  # an array
    assert torch.equal(torch.cat(list(iter_samples(imgs, batch_size=3))), imgs)  # a float tensor
    d = tmp_path / "dir"
    d.mkdir()
    Image.fromarray(u8[0]).save(d / "a.png")
    rgba = np.concatenate([u8[1], np.full((16, 16, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(d / "b.png")  # alpha dropped like pytorch-fid
    Image.fromarray(u8[2][..., 0], "L").save(d / "c.png")  # grayscale -> 3 equal channels
    Image.fromarray(u8[3]).resize((32, 32), Image.Resampling.NEAREST).save(d / "d.png")  # other size
    got = torch.cat(list(iter_image_dir(d, batch_size=3)))
    assert got.shape == (4, 3, 16, 16)
    assert torch.equal(got[0], imgs[0]) and torch.equal(got[1], imgs[1])
    assert torch.equal(got[2, 0], imgs[2, 0]) and torch.equal(got[2, 1], got[2, 2]) and torch.equal(got[2, 0], got[2, 1])
    assert (got[3] - imgs[3]).abs().mean() < 0.1  # a 2x nearest upscale resized back
    res = evaluate_samples(str(d), str(tmp_path / "s.npz"), fd_size=32, progress=False)
    assert res["num_samples"] == 4 and res["FD-opennsfw@32"] > 0
    with pytest.raises(TextokError, match="arr_0"):
        np.savez(tmp_path / "bad.npz", images=u8)
        list(iter_npz(tmp_path / "bad.npz"))


def test_gfid_and_is_with_inception_weights(tmp_path: Path, fake_inception: Path) -> None:
    imgs = scenes_images(4)
    res = evaluate_samples(imgs, imgs, inception_weights=str(fake_inception), is_splits=2, progress=False)
    assert abs(res["gFID"]) < 1e-6 and res["IS"] >= 1.0 and "IS_std" in res
    assert "FD-opennsfw" not in res and not res["skipped"]


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_lpips_with_vgg_weights_and_undecodable_images(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("lpips") is None:  # only its head weights are read (never imported)
        pytest.skip("lpips (for its v0.1 head weights) is not installed")
    from PIL import Image
    from safetensors.torch import save_file

    from textok.nets.vgg import VGG16Features

    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in VGG16Features(load=False).state_dict().items()}, str(vgg))
    folder = tmp_path / "data"
    folder.mkdir()
    imgs = scenes_images(5)
    for i, u in enumerate(to_uint8_nhwc(imgs)):
        Image.fromarray(u).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"not a png")  # counted, not a crash
    data = build_dataset(str(folder), "train", 16)
    model = Darken().train()
    res = evaluate_tokenizer(model, data, batch_size=2, vgg16_weights=str(vgg), fd_networks=(Toy(6),),
                             progress=False)
    assert model.training  # mode restored
    assert res["num_images"] == 4 and res["skipped_images"] == 1
    assert res["LPIPS"] > 0 and "LPIPS" not in res["skipped"] and "VGG16" in res["metric_notes"]["LPIPS"]
    same = evaluate_tokenizer(Identity(), data, vgg16_weights=str(vgg), fd_networks=(), progress=False)
    assert same["LPIPS"] == pytest.approx(0.0, abs=1e-9)
