"""Fréchet distance, streaming statistics, IS, PSNR/SSIM (vs scikit-image on real photos), RGB, CLIP score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from numerics import fd_tolerance, rounding_tolerance

from textok.errors import TextokError
from textok.eval.fid import FeatureSet, fd_between
from textok.eval import (
    FeatureStats,
    GaussianStats,
    compute_stats,
    frechet_distance,
    frechet_distance_between,
    frechet_distance_stats,
    inception_score,
    metric_name,
    pil_to_rgb,
    psnr,
    ssim,
    ssim_pm1,
    to_rgb,
)

skimage = pytest.importorskip("skimage")
from skimage import data as skdata  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402


# ----------------------------------------------------------------------------- Fréchet distance


def _random_gaussian(rng: np.random.Generator, d: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + shift
    return x.mean(0), np.cov(x, rowvar=False)


def _fd_by_eigenvalues(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all by symmetric eigh."""
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_frechet_distance_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    for d in (1, 8, 64):
        mu1, s1 = _random_gaussian(rng, d, 500, 0.0)
        mu2, s2 = _random_gaussian(rng, d, 500, 0.3)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(_fd_by_eigenvalues(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
        assert got > 0.0
    # 1-D closed form: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(
        4.0 + 1.0)
    # Identical statistics -> 0.
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # Tensors are accepted; sizes must agree.
    assert frechet_distance(torch.tensor(mu1), torch.tensor(s1), mu2, s2) == pytest.approx(
        frechet_distance(mu1, s1, mu2, s2))
    with pytest.raises(TextokError, match="different sizes"):
        frechet_distance(mu1, s1, mu1[:-1], s1[:-1, :-1])


def test_frechet_distance_singular_covariances_stay_finite() -> None:
    rng = np.random.default_rng(1)
    d = 32
    a, b = rng.normal(size=(10, d)), rng.normal(size=(10, d)) + 0.5  # n < d: rank-deficient covariances
    fd = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(fd) and fd > 0


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_streaming_stats_equal_all_at_once() -> None:
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(257, 16)) * 3.0 + 1e4  # large mean: checks the accumulation keeps precision
    st = FeatureStats(feature="toy")
    for lo, hi in [(0, 1), (1, 100), (100, 101), (101, 257)]:
        st.update(torch.tensor(feats[lo:hi], dtype=torch.float64) if lo % 2 else feats[lo:hi])
    assert st.num_samples == 257
    np.testing.assert_allclose(st.mu, feats.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(st.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(TextokError, match="feature size"):
        st.update(np.zeros((2, 15)))


def test_fewer_than_two_samples_refused() -> None:
    st = FeatureStats()
    with pytest.raises(TextokError, match="at least 1"):
        _ = st.mu
    st.update(np.ones((1, 4)))
    assert np.array_equal(st.mu, np.ones(4))
    with pytest.raises(TextokError, match="at least 2 images"):
        _ = st.sigma
    with pytest.raises(TextokError, match="at least 2 images"):
        st.to_gaussian()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_npz_round_trip_and_reference_batch_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    st = FeatureStats(feature="inception")
    st.update(rng.normal(size=(50, 6)))
    path = tmp_path / "stats.npz"
    st.save(path)
    with np.load(path) as f:  # what pytorch-fid reads
        np.testing.assert_array_equal(f["mu"], st.mu)
        np.testing.assert_array_equal(f["sigma"], st.sigma)
    g = GaussianStats.load(path)
    assert g.num_samples == 50 and g.feature == "inception"
    np.testing.assert_array_equal(g.sigma, st.sigma)
    assert frechet_distance_stats(g, st.to_gaussian()) == pytest.approx(0.0, abs=1e-9)
    # An ADM reference batch: images in arr_0 plus mu/sigma (and spatial stats) -> mu/sigma are used.
    adm = tmp_path / "VIRTUAL_imagenet256.npz"
    np.savez(adm, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=st.mu.astype(np.float32),
             sigma=st.sigma.astype(np.float32), mu_s=np.zeros(3), sigma_s=np.eye(3))
    ga = GaussianStats.load(adm)
    assert ga.num_samples is None and ga.feature is None
    np.testing.assert_allclose(ga.mu, st.mu, rtol=1e-6)
    # Only images, no statistics -> refused clearly.
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(TextokError, match="no 'mu'/'sigma'"):
        GaussianStats.load(tmp_path / "images.npz")
    with pytest.raises(TextokError, match="not found"):
        GaussianStats.load(tmp_path / "missing.npz")
    other = GaussianStats(g.mu, g.sigma, 50, "opennsfw")
    with pytest.raises(TextokError, match="different feature networks"):
        frechet_distance_stats(g, other)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_fd_between_lowrank_routes_match_sqrtm() -> None:
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(9, 16)) @ rng.normal(size=(16, 16))
    xb = rng.normal(size=(7, 16)) @ rng.normal(size=(16, 16)) + 0.5
    xc = rng.normal(size=(40, 16)) + 0.2  # more images than dims: full-rank covariance
    ref_ab = frechet_distance(xa.mean(0), np.cov(xa, rowvar=False), xb.mean(0), np.cov(xb, rowvar=False))
    ref_ac = frechet_distance(xa.mean(0), np.cov(xa, rowvar=False), xc.mean(0), np.cov(xc, rowvar=False))

    def fs(x, splits=(3,)):
        s = FeatureSet("t")
        for part in np.split(x, splits):
            s.update(part)
        return s

    a, b, c = fs(xa), fs(xb), fs(xc, (5, 17))
    assert a.features is not None and c.features is None  # c has more rows than dims: sums only
    tol_ab, tol_ac = fd_tolerance(xa, xb), fd_tolerance(xa, xc)  # the sqrtm references' own accuracy
    assert fd_between(a, b) == pytest.approx(ref_ab, abs=tol_ab)  # cross-Gram route
    assert fd_between(b, a) == pytest.approx(ref_ab, abs=tol_ab)
    assert fd_between(a, c) == pytest.approx(ref_ac, abs=tol_ac)  # features vs full covariance
    assert fd_between(c, a) == pytest.approx(ref_ac, abs=tol_ac)
    assert fd_between(a, c.to_gaussian()) == pytest.approx(ref_ac, abs=tol_ac)
    assert abs(fd_between(a, fs(xa, (1, 5)))) < rounding_tolerance(xa.dtype) * ref_ab
    with pytest.raises(TextokError, match="different feature networks"):
        fd_between(a, GaussianStats(xb.mean(0), np.cov(xb, rowvar=False), feature="other"))


# ----------------------------------------------------------------------------- Inception Score


def _is_reference(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """The improved-GAN / torch-fidelity recipe written plainly in numpy."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    n = len(p)
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_inception_score_hand_made_cases() -> None:
    mean, std = inception_score(np.zeros((100, 1008)))  # uniform predictions: IS = 1
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    k = 5  # confident and diverse: every split holds each of k classes equally -> IS = k
    logits = np.full((10 * k, k), -200.0)
    logits[np.arange(10 * k), np.arange(10 * k) % k] = 200.0
    mean, std = inception_score(torch.tensor(logits))
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # Confident but always the same class -> 1.
    same = np.full((20, 7), -50.0)
    same[:, 3] = 50.0
    assert inception_score(same, splits=2)[0] == pytest.approx(1.0, abs=1e-9)
    rng = np.random.default_rng(4)
    rand = rng.normal(size=(103, 30)) * 3
    np.testing.assert_allclose(inception_score(rand), _is_reference(rand, 10), rtol=1e-10)
    with pytest.raises(TextokError, match="at least 10 images"):
        inception_score(np.zeros((9, 1008)))


# ----------------------------------------------------------------------------- feature-space API


class _PoolFeatures(nn.Module):
    """A toy extractor: 4x4 average-pooled pixels, named like a real network would be."""

    name = "toypool"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_compute_stats_streams_and_names_metric() -> None:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(23, 3, 16, 16, generator=g) * 2 - 1
    batches = [images[i:i + 5] for i in range(0, 23, 5)]
    ext = _PoolFeatures()
    st = compute_stats(ext, batches, progress=True)
    feats = ext(images).double().numpy()
    assert st.num_samples == 23 and st.feature == "toypool"
    np.testing.assert_allclose(st.sigma, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-9)
    name, value = frechet_distance_between(ext, batches, st.to_gaussian(), progress=False)
    assert name == "FD-toypool" and value == pytest.approx(0.0, abs=1e-6)
    name, value = frechet_distance_between(ext, [(b * 0.5, None) for b in batches], iter(batches), progress=False)
    assert value > 1e-3
    q = compute_stats(ext, batches, progress=False, quantize=True)
    assert not np.allclose(q.mu, st.mu, atol=0) and np.allclose(q.mu, st.mu, atol=1 / 127.5)


def test_metric_names_are_honest() -> None:
    class Named(nn.Module):
        def __init__(self, name: str, real: bool) -> None:
            super().__init__()
            self.name, self.real_weights = name, real

    assert metric_name(Named("opennsfw", True)) == "FD-opennsfw"
    assert metric_name(Named("inception", False)) == "FD-inception"
    assert metric_name(Named("inception", True)) == "FID"
    with pytest.raises(TextokError, match="name"):
        metric_name(nn.Identity())


# ----------------------------------------------------------------------------- PSNR / SSIM vs scikit-image


def _photo(name: str) -> np.ndarray:
    return getattr(skdata, name)().astype(np.float64) / 255.0  # (H, W, 3) in [0, 1]


def _distort(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        return np.clip(img + rng.normal(scale=0.08, size=img.shape), 0, 1)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=(2.0, 2.0, 0))  # blur


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None]


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_psnr_ssim_match_skimage_on_photos(name: str) -> None:
    rng = np.random.default_rng(6)
    ref = _photo(name)
    for kind in ("noise", "blur"):
        dist = _distort(ref, kind, rng)
        want_ssim = structural_similarity(ref, dist, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1.0, channel_axis=2)
        got_ssim = float(ssim(_t(ref), _t(dist), data_range=1.0)[0])
        assert abs(got_ssim - want_ssim) < 1e-4, (kind, got_ssim, want_ssim)
        assert 0.05 < got_ssim < 0.999
        want_psnr = peak_signal_noise_ratio(ref, dist, data_range=1.0)
        assert float(psnr(_t(ref), _t(dist), data_range=1.0)[0]) == pytest.approx(want_psnr, rel=1e-9)
        # The textok [-1, 1] helpers report the same numbers.
        ref_pm, dist_pm = _t(ref) * 2 - 1, _t(dist) * 2 - 1
        assert float(ssim_pm1(ref_pm, dist_pm)[0]) == pytest.approx(got_ssim, abs=1e-12)
        assert float(psnr(ref_pm, dist_pm, data_range=2.0)[0]) == pytest.approx(want_psnr, rel=1e-9)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_ssim_batched_float32_and_uint8_scale() -> None:
    rng = np.random.default_rng(7)
    ref = _photo("astronaut")[::2, ::2]
    dists = [_distort(ref, "noise", rng), _distort(ref, "blur", rng), ref]
    x = torch.cat([_t(ref)] * 3).float()
    y = torch.cat([_t(d) for d in dists]).float()
    got = ssim(x, y, data_range=1.0)
    assert got.shape == (3,) and float(got[2]) == pytest.approx(1.0, abs=1e-9)
    for i, d in enumerate(dists[:2]):
        want = structural_similarity(ref, d, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0, channel_axis=2)
        assert abs(float(got[i]) - want) < 1e-4
    # [0, 255] with data_range 255 is the same number as [0, 1] with data_range 1.
    torch.testing.assert_close(ssim(x * 255, y * 255, data_range=255.0), got.double())
    assert torch.isinf(psnr(x, x, data_range=1.0)).all()
    with pytest.raises(TextokError, match="too small"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_to_rgb_converts_or_refuses() -> None:
    gray = torch.rand(2, 1, 5, 5)
    rgb = to_rgb(gray)
    assert rgb.shape == (2, 3, 5, 5) and torch.equal(rgb[:, 0], rgb[:, 2]) and torch.equal(rgb[:, 1], gray[:, 0])
    rgba = torch.rand(2, 4, 5, 5)
    assert torch.equal(to_rgb(rgba), rgba[:, :3])
    comp = to_rgb(rgba, alpha="composite", background=1.0)
    torch.testing.assert_close(comp, rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:]))
    la = torch.rand(6, 6, 2)
    assert to_rgb(la, channel_axis=-1).shape == (6, 6, 3)
    u8 = torch.tensor([[[[0]], [[255]]]], dtype=torch.uint8).expand(1, 2, 1, 1)  # gray 0, fully opaque
    assert to_rgb(u8, alpha="composite", background=255).tolist() == [[[[0]], [[0]], [[0]]]]
    with pytest.raises(TextokError, match="5-channel"):
        to_rgb(torch.zeros(1, 5, 4, 4))
    with pytest.raises(TextokError, match="channel axis"):
        to_rgb(torch.zeros(4, 4))
    from PIL import Image

    for mode in ("L", "LA", "P", "RGBA", "CMYK", "I;16"):
        img = Image.new(mode, (4, 3))
        out = pil_to_rgb(img)
        assert out.mode == "RGB" and out.size == (4, 3)
    with pytest.raises(TextokError, match="PIL image"):
        pil_to_rgb(np.zeros((3, 3)))


# ----------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "photo", "of", "cat", "dog", "red", "blue", "car"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                      special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]", eos_token="[EOS]")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_clip_score_against_clip_forward(tiny_clip_dir: Path) -> None:
    from transformers import CLIPModel

    from textok.eval import ClipScoreAccumulator, ClipScorer

    scorer = ClipScorer.from_pretrained(tiny_clip_dir)
    g = torch.Generator().manual_seed(8)
    images = torch.rand(4, 3, 48, 40, generator=g) * 2 - 1
    texts = ["a photo of a cat", "a red car", "dog", "a blue " + "car " * 30]  # the last one gets truncated
    raw = scorer.raw_scores(images, texts)
    # Independent route: CLIPModel's own forward, logits_per_image = exp(logit_scale) * cos.
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = scorer.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    pixel_values=scorer.preprocess(images))
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(raw, 100 * cos, rtol=1e-4, atol=1e-4)
    assert raw.abs().max() <= 100.0 + 1e-4
    torch.testing.assert_close(scorer.scores(images, texts), (100 * cos).clamp_min(0), rtol=1e-4, atol=1e-4)
    assert float(scorer(images, texts)) == pytest.approx(max(float((100 * cos).mean()), 0.0), abs=1e-4)
    acc = ClipScoreAccumulator(scorer)
    acc.update(images[:2], texts[:2])
    acc.update(images[2:], texts[2:])
    assert acc.compute() == pytest.approx(max(float(raw.double().mean()), 0.0), abs=1e-5)
    with pytest.raises(TextokError, match="one caption per image"):
        scorer.raw_scores(images, texts[:3])


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_clip_preprocess_and_missing_model(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from textok.eval import ClipScorer

    scorer = ClipScorer.from_pretrained(tiny_clip_dir)
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # already at the model size: only normalisation happens
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(scorer.preprocess(x), ((x + 1) / 2 - mean) / std)
    assert scorer.preprocess(torch.zeros(1, 3, 64, 96)).shape == (1, 3, 32, 32)  # short side resized, centre crop
    # preprocessor_config.json values are honoured.
    (tmp_path / "m").mkdir()
    for f in tiny_clip_dir.iterdir():
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    s2 = ClipScorer.from_pretrained(tmp_path / "m")
    assert s2.image_size == 40 and s2.crop_size == 32
    x40 = torch.rand(2, 3, 40, 40) * 2 - 1  # short side already 40: centre crop only; mean/std 0.5 undo [0, 1]
    torch.testing.assert_close(s2.preprocess(x40), x40[:, :, 4:36, 4:36])
    with pytest.raises(TextokError, match="no CLIP model"):
        ClipScorer.from_pretrained(tmp_path / "empty")
