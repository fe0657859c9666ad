"""ImageFolder tokenizer: presets vs the paper, codes per branch and scale, prefix rebuilds, the semantic branch,
the DINOv2 teacher loader, save/load, text, and one run of the tokenizer training loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import random_text
from textok.errors import CheckpointMismatchError, ConfigError, TextokError
from textok.models.imagefolder import ImageFolder, ImageFolderConfig, symmetric_info_nce
from textok.models.registry import load_tokenizer, resolve_tokenizer_config
from textok.models.dinov2 import load_dinov2, resample_patch_kernel

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*overrides: str, seed: int = 0) -> ImageFolder:
    torch.manual_seed(seed)
    return ImageFolder(ImageFolderConfig.preset("imagefolder-tiny").override(list(overrides)))


def images(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- a tiny random DINOv2 ViT, written by the test from a transformers Dinov2Model -----------------------------
def _hf_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Dinov2Model keys -> the official / timm layout the loader reads."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "mask_token": state["embeddings.mask_token"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    for i in range(depth):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention."
        for part in ("weight", "bias"):
            out[t + f"attn.qkv.{part}"] = torch.cat([state[att + f"{n}_proj.{part}"] for n in "qkv"])
            out[t + f"attn.proj.{part}"] = state[att + f"o_proj.{part}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[t + f"{n}.{part}"] = state[h + f"{n}.{part}"]
        out[t + "ls1.gamma"] = state[h + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = state[h + "layer_scale2.lambda1"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """(path of a width-64, 2-block, patch-14 DINOv2 checkpoint with a 4x4 position grid, the HF reference)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, patch_size=14,
                                  image_size=56)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_scale" in name or "token" in name or "position" in name:
                p.normal_(0, 0.5)  # the defaults (1e-5 scale, zeros) would hide mistakes
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny.safetensors"
    save_file(_hf_to_timm(hf.state_dict()), str(path))
    return path, hf


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_dinov2_loader_matches_a_reference_implementation(tiny_dinov2):
    path, hf = tiny_dinov2
    net = load_dinov2(path, patch_size=None, image_size=56)
    assert net.feature_dim == 64 and len(net.blocks) == 2 and net.patch_size == 14
    assert not any(p.requires_grad for p in net.parameters())
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=px).pooler_output
        got = net.features(px)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_dinov2_patch_resample_and_position_grid(tiny_dinov2):
    path, _ = tiny_dinov2
    w = torch.randn(5, 3, 14, 14, dtype=torch.float64)
    w16 = resample_patch_kernel(w, 16)
    x = torch.randn(7, 3, 14, 14, dtype=torch.float64)
    x16 = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
    # FlexiViT's property: a resized patch through the new kernel = the patch through the old one
    assert torch.allclose(torch.einsum("nchw,dchw->nd", x16, w16), torch.einsum("nchw,dchw->nd", x, w), rtol=1e-8,
                          atol=1e-8)
    net = load_dinov2(path, patch_size=16, image_size=64)  # 4x4 grid at 16 px patches; images resized to 64
    assert net.patch_size == 16 and net.forward(torch.rand(3, 3, 32, 32) * 2 - 1).shape == (3, 64)
    with pytest.raises(TextokError, match="does not exist"):
        load_dinov2(path.parent / "missing.safetensors")
    bad = path.parent / "not_a_vit.safetensors"
    save_file({"weight": torch.zeros(2)}, str(bad))
    with pytest.raises(TextokError, match="not a DINOv2"):
        load_dinov2(bad)


# ---- presets --------------------------------------------------------------------------------------------------
def test_paper_preset_sizes_and_counts():
    cfg = ImageFolderConfig.preset("imagefolder-b-256")
    q = cfg.quantizer
    assert (cfg.image_size, cfg.patch_size, cfg.latent_grid) == (256, 16, 11)
    assert (q.branches, q.num_codes, q.code_dim, q.scales) == (2, 4096, 32, (1, 1, 2, 3, 3, 4, 5, 6, 8, 11))
    assert (cfg.num_tokens, cfg.token_channels, cfg.num_latent_tokens) == (121, 64, 242)
    assert (q.codes_per_branch, cfg.codes_per_image) == (286, 572)
    assert not cfg.uses_text and cfg.semantic_teacher == "opennsfw" and cfg.semantic_weight == 0.1
    with torch.device("meta"):
        model = ImageFolder(cfg)
    counts = model.num_parameters()
    vit = 12 * 12 * 768**2  # ViT-B: 12 blocks of 12 D^2
    for side in ("encoder", "decoder"):
        assert 1.0 < counts[side] / vit < 1.05, (side, counts[side])
    assert counts["quantizer"] == 2 * (4096 * 32 + 4 * (32 * 32 * 9 + 32))  # codebooks + 4 shared phi convs each
    assert counts["total"] == counts["encoder"] + counts["decoder"] + counts["quantizer"] + counts["semantic_proj"]
    assert 170e6 < counts["total"] < 175e6
    recon, zq = model(torch.empty(2, 3, 256, 256, device="meta"))
    assert recon.shape == (2, 3, 256, 256) and zq.shape == (2, 121, 64)
    assert model.flops_per_image() > 2 * 2 * 86e6 * 256  # two ViT-B over >= 256 tokens


@pytest.mark.parametrize("name", ["imagefolder-s-32", "imagefolder-s-64", "imagefolder-tiny"])
def test_cpu_presets_and_registry(name):
    model_type, cfg = resolve_tokenizer_config(name)
    assert model_type == "imagefolder" and cfg.quantizer.scales[-1] == cfg.latent_grid
    assert cfg.image_size in (16, 32, 64)
    with torch.device("meta"):
        assert ImageFolder(cfg).num_parameters()["total"] < 2e6


def test_scale_schedule_must_end_at_k():
    with pytest.raises(ConfigError, match="last scale must be the full K x K grid"):
        ImageFolderConfig(latent_grid=10)
    with pytest.raises(ConfigError, match="latent_grid K=4"):
        ImageFolderConfig.preset("imagefolder-tiny").override(["latent_grid=4"])
    for order in (["latent_grid=4", "quantizer.scales=[1,2,4]"], ["quantizer.scales=[1,2,4]", "latent_grid=4"]):
        ok = ImageFolderConfig.preset("imagefolder-tiny").override(order)  # checked once, after all assignments
        assert ok.num_tokens == 16 and ok.token_channels == 16 and ok.quantizer.scales == (1, 2, 4)
    with pytest.raises(ConfigError, match="semantic_teacher"):
        ImageFolderConfig(semantic_teacher="dino")
    with pytest.raises(ConfigError, match="num_tokens follows from latent_grid; set that instead"):
        ImageFolderConfig().override(["num_tokens=5"])  # derived from latent_grid
    cfg = ImageFolderConfig.preset("imagefolder-s-32")
    assert ImageFolderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()  # what a checkpoint stores compares equal
    with pytest.raises(ConfigError, match="does not follow"):
        ImageFolderConfig.from_dict({**cfg.to_dict(), "num_tokens": 7})


# ---- codes and rebuilds ---------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_codes_per_branch_and_scale_and_prefix_rebuilds():
    model = tiny().eval()
    x = images()
    codes = model.encode_codes(x)
    assert codes.shape == (4, 2, 1 + 4 + 9) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
    maps = model.codes_per_scale(codes)
    assert [m.shape for m in maps] == [(4, 2, 1, 1), (4, 2, 2, 2), (4, 2, 3, 3)]
    zq = model.encode(x)
    assert zq.shape == (4, 9, 16)
    assert torch.allclose(model.fhat_from_codes(codes), zq, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.decode_codes(codes), model.decode(zq), rtol=1e-4, atol=1e-5)
    assert torch.allclose(model(x)[0], model.decode(zq), rtol=1e-4, atol=1e-5)
    for n in (1, 2):  # a prefix: the first n scales' codes, or all codes and num_scales=n
        prefix = codes[:, :, :model.quantizer.offsets[n]]
        assert torch.allclose(model.fhat_from_codes(prefix), model.fhat_from_codes(codes, num_scales=n))
        assert model.decode_codes(prefix).shape == (4, 3, 16, 16)
    assert not torch.allclose(model.fhat_from_codes(codes, 1), zq)
    assert model.teacher_forcing_inputs(codes).shape == (4, 4 + 9, 16)
    with pytest.raises(TextokError, match="prefix"):
        model.decode_codes(codes[:, :, :3])
    with pytest.raises(TextokError, match="batch, 2, length"):
        model.decode_codes(codes[:, 0])


def test_single_branch_variant_works():
    """The official release crashes without product quantization; here P = 1 is a plain config."""
    model = tiny("quantizer.branches=1", "semantic_branches=last")
    recon, terms = model.training_losses(images())
    assert recon.shape == (4, 3, 16, 16) and model.encode_codes(images()).shape == (4, 1, 14)
    assert "metric/usage_b0_s2" in terms and "metric/usage_b1_s0" not in terms


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_branch_tokens_have_2d_positions_and_branch_embeddings():
    model = tiny()
    enc = model.encoder
    assert not hasattr(enc, "latent_pos") or "latent_pos" not in dict(enc.named_parameters())
    lat = enc.latent_inputs() - enc.latent_tokens  # (1, P K^2, D)
    K2 = 9
    # the same cell in both branches differs only by the branch embeddings
    diff = lat[:, K2:] - lat[:, :K2]
    assert torch.allclose(diff, (enc.branch_embed[:, 1] - enc.branch_embed[:, 0]).expand_as(diff), atol=1e-6)


# ---- training terms and the semantic branch -------------------------------------------------------------------
def test_training_losses_terms_and_usage_metrics():
    model = tiny()
    recon, terms = model.training_losses(images())
    assert recon.shape == (4, 3, 16, 16) and "semantic" not in terms  # teacher none in the tiny preset
    usage = {k for k in terms if k.startswith("metric/usage_")}
    assert usage == {f"metric/usage_b{p}_s{s}" for p in range(2) for s in range(3)}
    assert all(t.dim() == 0 for t in terms.values())
    assert terms["quantizer"].requires_grad and not terms["metric/codebook_usage"].requires_grad


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_info_nce_by_hand_and_excluded_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.2], [0.1, 1.0], [-1.0, 0.3]])
    s = 2.0
    na, nb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = s * na @ nb.t()
    ab = -logits.diag() + logits.logsumexp(1)
    ba = -logits.diag() + logits.logsumexp(0)
    want = float((0.5 * (ab + ba)).mean())
    assert math.isclose(float(symmetric_info_nce(a, b, torch.ones(3, dtype=torch.bool), s)), want, rel_tol=1e-5)
    rows = torch.tensor([True, False, True])  # a dropped row: out of the softmaxes and of the mean
    sub = symmetric_info_nce(a[rows], b[rows], torch.ones(2, dtype=torch.bool), s)
    assert math.isclose(float(symmetric_info_nce(a, b, rows, s)), float(sub), rel_tol=1e-5)
    assert float(symmetric_info_nce(a, b, torch.zeros(3, dtype=torch.bool), s)) == 0.0


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.parametrize("which", ["last", "all"])
def test_semantic_gradient_reaches_only_its_branch_and_never_the_teacher(tiny_dinov2, which):
    path, _ = tiny_dinov2
    model = tiny(f"semantic_teacher=dinov2:{path}", "semantic_dim=64", "teacher_size=32", f"semantic_branches={which}")
    x = images(6)
    z = model.encode_latents(x).detach().requires_grad_(True)
    out = model.quantizer(z)
    loss = model.semantic_loss(x, out.quantized, torch.ones(6, dtype=torch.bool))
    loss.backward()
    teacher = model.teacher()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert model.semantic_proj.weight.grad.abs().sum() > 0
    grad = z.grad.abs().sum(-1)  # (B, P K^2): branch 0 = tokens 0..8, branch 1 = 9..17
    assert bool((grad[:, 9:] > 0).all())
    assert bool((grad[:, :9] > 0).any()) == (which == "all")
    if which == "last":
        assert all(p.grad is None for p in model.quantizer.branches[0].parameters())
    # in the full training terms: weighted 0.1, the teacher is no submodule (not saved, not trained)
    recon, terms = model.training_losses(x)
    assert math.isclose(float(terms["semantic"].detach()), 0.1 * float(terms["metric/semantic_loss"]), rel_tol=1e-6)
    assert not any(k.startswith("_teacher") or "teacher." in k for k in model.state_dict())


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_semantic_loss_leaves_out_the_dropped_rows(tiny_dinov2):
    path, _ = tiny_dinov2
    model = tiny(f"semantic_teacher=dinov2:{path}", "semantic_dim=64", "teacher_size=32", "quantizer.dropout=0.5")
    x = images(8)
    torch.manual_seed(3)
    keep = model.quantizer.sample_dropout(8)
    assert (keep < 3).any()
    torch.manual_seed(3)
    _, terms = model.training_losses(x)  # draws the same keep first
    zq = model.quantizer(model.encode_latents(x), keep).quantized
    want = model.semantic_loss(x, zq, keep >= 3)
    assert math.isclose(float(terms["metric/semantic_loss"]), float(want.detach()), rel_tol=1e-5)
    assert math.isclose(float(terms["metric/dropped_rows"]), float((keep < 3).float().mean()), rel_tol=1e-6)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_opennsfw_teacher_and_loading_it_leaves_the_rng_alone():
    model = tiny("semantic_teacher=opennsfw", "teacher_size=32")
    assert model.config.teacher_dim == 1024 and model.semantic_proj.in_features == 1024
    torch.manual_seed(5)
    before = torch.get_rng_state()
    teacher = model.teacher()
    assert torch.equal(torch.get_rng_state(), before)  # a resumed run loads it at another step
    assert teacher(images()).shape == (4, 1024) and not any(p.requires_grad for p in teacher.parameters())
    _, terms = model.training_losses(images())
    assert terms["semantic"].requires_grad and math.isfinite(float(terms["metric/semantic_loss"]))


def test_wrong_teacher_width_is_a_clear_error(tiny_dinov2):
    path, _ = tiny_dinov2
    model = tiny(f"semantic_teacher=dinov2:{path}", "teacher_size=32")  # semantic_dim defaults to 768
    with pytest.raises(TextokError, match="set semantic_dim=64"):
        model.training_losses(images())


# ---- text, save / load, the training loop ---------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_text_is_off_by_default_and_a_switch():
    model = tiny()
    x = images()
    assert torch.equal(model(x)[0], model(x, random_text(4))[0])  # ignored when off
    with_text = tiny("text_in_encoder=true", "text_in_decoder=true")
    a = with_text(x, random_text(4, seed=0))[0]
    b = with_text(x, random_text(4, seed=1))[0]
    assert not torch.allclose(a, b)
    with pytest.raises(TextokError, match="conditioned on text"):
        with_text(x)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_save_load_round_trip(tmp_path, tiny_dinov2):
    path, _ = tiny_dinov2
    model = tiny(f"semantic_teacher=dinov2:{path}", "semantic_dim=64", "teacher_size=32").eval()
    model.training_losses(images())  # the teacher is loaded now; it must not be written
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model_type"] == "imagefolder" and "num_tokens" not in meta["config"]
    loaded = ImageFolder.from_pretrained(tmp_path / "m")
    again = load_tokenizer(tmp_path / "m")
    assert isinstance(again, ImageFolder) and loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = images()
    assert torch.equal(model.encode_codes(x), loaded.eval().encode_codes(x))
    other = ImageFolderConfig.preset("imagefolder-tiny").override(["quantizer.num_codes=32"])
    with pytest.raises(CheckpointMismatchError, match="quantizer.num_codes"):
        ImageFolder.from_pretrained(tmp_path / "m", config=other)


def test_tokenizer_training_loop_trains_imagefolder(tmp_path):
    """The existing loop, unchanged, trains ImageFolder: its terms are added, its metrics logged."""
    from textok.train.config import load_train_config
    from textok.train.tokenizer import train_tokenizer

    cfg = load_train_config("imagefolder-tiny", ["batch_size=4", "data.train_size=16", "data.val_size=4",
                                                 "max_steps=3", "log_every=1", "sample_every=3", "ckpt_every=3",
                                                 "optim.warmup_steps=1", "loss.perceptual=none"])
    final = train_tokenizer(cfg, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    last = log[-1]
    assert last["quantizer"] > 0 and "metric/usage_b1_s2" in last and "metric/perplexity" in last
    model = load_tokenizer(final)
    assert isinstance(model, ImageFolder) and model.encode_codes(images()).shape == (4, 2, 14)
    assert (tmp_path / "run" / "samples" / "step-0000003.png").is_file()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_resume_is_exact_with_dropout_and_a_lazily_loaded_teacher(tmp_path, tiny_dinov2):
    """4 steps in one run == 2 steps, stop, resume to 4: quantizer dropout draws from the checkpointed RNG, and
    loading the teacher at a different step does not shift it."""
    from safetensors.torch import load_file

    from textok.train.config import load_train_config
    from textok.train.tokenizer import train_tokenizer

    path, _ = tiny_dinov2
    base = ["batch_size=4", "data.train_size=16", "data.val_size=4", "log_every=1", "sample_every=0",
            "ckpt_every=2", "optim.warmup_steps=1", "loss.perceptual=none", f"model.semantic_teacher=dinov2:{path}",
            "model.semantic_dim=64", "model.teacher_size=32", "model.quantizer.dropout=0.5"]
    train_tokenizer(load_train_config("imagefolder-tiny", base + ["max_steps=4"]), tmp_path / "a", progress=False)
    train_tokenizer(load_train_config("imagefolder-tiny", base + ["max_steps=2"]), tmp_path / "b", progress=False)
    train_tokenizer(load_train_config("imagefolder-tiny", base + ["max_steps=4"]), tmp_path / "b", progress=False)
    a, b = load_file(str(tmp_path / "a/final/model.safetensors")), load_file(str(tmp_path / "b/final/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all("semantic" in e for e in log) and any(e["metric/dropped_rows"] > 0 for e in log)
