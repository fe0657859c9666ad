"""`textok convert --from imagefolder`: adobe-research ImageFolder's released tokenizers.

A random training checkpoint of the manifest's test size (the official layout with a 32-wide, 2-block ViT at 16 px,
2 branches of 64 codes x 8 channels on scales 1, 1, 2, 3) is converted through the CLI, loaded by the tokenizer
verbs and run. The folding (LayerScale into the linear layers, class/position/level embeddings into textok's
constant tokens) is proven in float64 against a functional restatement of the official forward written here. The
published sizes map exactly on the meta device; bad keys and level buffers are refused naming the problem.
(Agreement with the official code itself: benchmarks/results/convert-equivalence.md.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert_checkpoints import check_info_and_reconstruct, check_published_layout, random_checkpoint, run
from numerics import assert_same_maths
from textok.convert import convert, load_manifest
from textok.convert.checkpoint import read_checkpoint, read_published
from textok.convert.imagefolder import imagefolder_config, imagefolder_state
from textok.errors import TextokError
from textok.models.dinov2 import load_dinov2
from textok.models.imagefolder import ImageFolder
from textok.models.multiscale import PAPER_SCALES
from textok.models.registry import load_tokenizer


def _training_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The release's container: model and EMA weights (different), optimizer state, step, argparse arguments."""
    ema = random_checkpoint("imagefolder", seed=seed)
    torch.save({"model": random_checkpoint("imagefolder", seed=seed + 1), "ema": ema, "steps": 7,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]},
                "args": argparse.Namespace(codebook_size=64, v_patch_nums=[1, 1, 2, 3], ema=True)}, path)
    return ema


@pytest.fixture
def imagefolder_dir(tmp_path) -> Path:
    path = tmp_path / "imagenet-tiny.pt"
    _training_checkpoint(path)
    return convert("imagefolder", path, tmp_path / "if").directory


def test_imagefolder_converts_from_its_ema_and_the_tokenizer_verbs_load_it(tmp_path, capsys):
    path = tmp_path / "imagenet-tiny.pt"
    ema = _training_checkpoint(path)
    out_dir = tmp_path / "if"
    code, out, err = run(["convert", "--from", "imagefolder", path, "--out", out_dir], capsys)
    assert code == 0, err
    assert "tiny-test" in out and "textok eval reconstruction --model" in out
    record = json.loads((out_dir / "config.json").read_text())
    assert record["model_type"] == "imagefolder" and record["converted_from"]["container"] == ["ema"]
    assert record["converted_from"]["published_settings"]["semantic_guide"] == "dinov2"
    model = load_tokenizer(out_dir).eval()
    assert model.config.semantic_teacher == "none" and model.config.decoder_prefix_tokens == 1
    torch.testing.assert_close(model.quantizer.branches[1].embedding.weight, ema["quantizes.1.embedding.weight"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = model.encode_codes(images)
        recon = model.decode_codes(codes)
    assert codes.shape == (2, 2, 1 + 1 + 4 + 9) and recon.shape == images.shape and torch.isfinite(recon).all()
    check_info_and_reconstruct(out_dir, 16, tmp_path, capsys, info_says="quantizer")


def test_eval_and_extract_latents_run_on_the_converted_tokenizer(imagefolder_dir, tmp_path, capsys):
    code, out, err = run(["eval", "reconstruction", "--model", imagefolder_dir, "--data", "scenes", "--num", "2",
                          "--fd-size", "32", "--quiet", "--out", tmp_path / "e.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["num_images"] == 2
    code, out, err = run(["extract-latents", "--tokenizer", imagefolder_dir, "--num", "4", "--out", tmp_path / "lat",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert any((tmp_path / "lat").iterdir())


def test_the_released_pair_converts_from_the_var_file_and_samples(tmp_path, capsys):
    """The VAR trainer's checkpoint stores the tokenizer it trained with (``["trainer"]["vae_local"]``, loaded
    strictly from the tokenizer release, so in its layout): ``--from imagefolder`` reads it from there, and the
    VAR in the same file converts over it and samples images through it."""
    tokenizer_state = random_checkpoint("imagefolder", seed=4)
    path = tmp_path / "imagenet-var-tiny.pt"
    torch.save({"epoch": 3, "args": {"depth": 2, "patch_nums": (1, 1, 2, 3)},
                "trainer": {"config": {"patch_nums": (1, 1, 2, 3)}, "var_wo_ddp": random_checkpoint("imagefolder-var"),
                            "vae_local": tokenizer_state}}, path)
    code, out, err = run(["convert", "--from", "imagefolder", path, "--out", tmp_path / "tok"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "tok" / "config.json").read_text())["converted_from"]
    assert record["container"] == ["trainer", "vae_local"]
    tokenizer = load_tokenizer(tmp_path / "tok")
    torch.testing.assert_close(tokenizer.quantizer.branches[0].embedding.weight,
                               tokenizer_state["quantizes.0.embedding.weight"])
    code, out, err = run(["convert", "--from", "imagefolder-var", path, "--out", tmp_path / "var", "--tokenizer",
                          tmp_path / "tok"], capsys)
    assert code == 0, err
    code, out, err = run(["sample", "--generator", tmp_path / "var", "--class", 3, "--n", 2, "--out",
                          tmp_path / "s.png"], capsys)
    assert code == 0 and (tmp_path / "s.png").is_file(), err


def test_teacher_out_writes_the_dinov2_teacher_textok_trains_with(tmp_path, capsys):
    """The file's frozen DINOv2 (``semantic_model.*``) is written with --teacher-out in the layout textok's
    ``dinov2:FILE`` teacher reads, and an ImageFolder of the converted layout computes its semantic loss with it."""
    path = tmp_path / "imagenet-tiny.pt"
    ema = _training_checkpoint(path)
    teacher = tmp_path / "teacher.safetensors"
    code, out, err = run(["convert", "--from", "imagefolder", path, "--out", tmp_path / "if", "--teacher-out",
                          teacher], capsys)
    assert code == 0 and f"semantic_teacher=dinov2:{teacher}" in out, err
    net = load_dinov2(teacher, patch_size=None, image_size=16)
    for key in ("cls_token", "pos_embed", "blocks.1.ls2.gamma", "norm.weight"):
        torch.testing.assert_close(net.state_dict()[key], ema[f"semantic_model.{key}"])
    model = load_tokenizer(tmp_path / "if")
    config = dataclasses.replace(model.config, semantic_teacher=f"dinov2:{teacher}", semantic_dim=32)
    tuned = ImageFolder(config)
    missing, unexpected = tuned.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("semantic_proj.") for k in missing)
    _, terms = tuned.train().training_losses(torch.rand(4, 3, 16, 16) * 2 - 1)
    assert torch.isfinite(terms["semantic"]) and terms["semantic"] > 0
    code, out, err = run(["convert", "--from", "var-vqvae", path, "--out", tmp_path / "v", "--teacher-out",
                          tmp_path / "t.safetensors"], capsys)
    assert code == 2 and "stores no training teacher" in err and not (tmp_path / "t.safetensors").exists()


# ---- the folding, against a restatement of the official forward -------------------------------------------

def _official_vit(state: dict, prefix: str, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """timm's DINOv2 blocks: pre-norm, LayerScale on both branches, exact GELU, LayerNorm eps 1e-6."""
    B, L, D = x.shape
    ln = lambda t, name: F.layer_norm(t, (D,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)  # noqa: E731
    lin = lambda t, name: F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])  # noqa: E731
    for i in range(depth):
        b = f"{prefix}.blocks.{i}"
        q, k, v = lin(ln(x, f"{b}.norm1"), f"{b}.attn.qkv").reshape(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1) @ v
        x = x + state[f"{b}.ls1.gamma"] * lin(attn.transpose(1, 2).reshape(B, L, D), f"{b}.attn.proj")
        x = x + state[f"{b}.ls2.gamma"] * lin(F.gelu(lin(ln(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    return ln(x, f"{prefix}.norm")


def _resampled(pos: torch.Tensor, side: int) -> torch.Tensor:
    """The official _pos_embed of a (B, side, side, D) input: the patch positions, bicubic with antialiasing."""
    n = int(round((pos.shape[1] - 1) ** 0.5))
    grid = pos[0, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)


def _official_forward(state: dict, s: dict, images: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor]:
    """(encoder output after quant_conv (B, P K^2, C), codes per branch and scale, clamped reconstruction)."""
    B, p, K, P, C = images.shape[0], s["patch_size"], int(s["num_latent_tokens"] ** 0.5), s["product_quant"], \
        s["codebook_embed_dim"]
    depth, heads = s["depth"], s["heads"]
    # encoder: [cls, patches] + pos, then each branch's latent tokens + resampled pos, + level embeddings
    e = "encoder.model"
    x = F.conv2d(images, state[f"{e}.patch_embed.proj.weight"], state[f"{e}.patch_embed.proj.bias"], stride=p)
    x = torch.cat([state[f"{e}.cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + state[f"{e}.pos_embed"]
    latents = state["encoder.latent_tokens"].reshape(P, K * K, -1) + _resampled(state[f"{e}.pos_embed"], K)
    x = torch.cat([x, latents.reshape(1, P * K * K, -1).expand(B, -1, -1)], 1)
    x = x + state["encoder.lvl_embed.weight"][state["encoder.lvl1LC"][0]]
    h = _official_vit(state, e, x, depth, heads)[:, -P * K * K:]
    f = torch.einsum("bld,cd->blc", h, state["quant_conv.weight"][:, :, 0, 0]) + state["quant_conv.bias"]
    # quantizers: per branch, VAR's f_to_idxBl_or_fhat with cosine matching and partially shared phi
    scales, n_phi, r = s["v_patch_nums"], s["share_quant_resi"], s["quant_resi"]
    ticks = np.linspace(1 / 3 / n_phi, 1 - 1 / 3 / n_phi, n_phi)
    fhats, codes = [], []
    for b in range(P):
        book = state[f"quantizes.{b}.embedding.weight"]
        rest = f[:, b * K * K:(b + 1) * K * K].transpose(1, 2).reshape(B, C, K, K)
        fhat, mine = torch.zeros_like(rest), []
        for si, pn in enumerate(scales):
            z = F.interpolate(rest, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
            idx = (F.normalize(z, dim=-1) @ F.normalize(book.T, dim=0)).argmax(1)
            hq = book[idx].reshape(B, pn, pn, C).permute(0, 3, 1, 2)
            if si != len(scales) - 1:
                hq = F.interpolate(hq, size=(K, K), mode="bicubic")
            k = int(np.argmin(np.abs(ticks - si / (len(scales) - 1))))
            conv = F.conv2d(hq, state[f"quantizes.{b}.quant_resi.qresi_ls.{k}.weight"],
                            state[f"quantizes.{b}.quant_resi.qresi_ls.{k}.bias"], padding=1)
            hq = hq * (1 - r) + conv * r
            fhat, rest = fhat + hq, rest - hq
            mine.append(idx.reshape(B, pn * pn))
        fhats.append(fhat)
        codes.append(mine)
    # decoder: [cls, masks] + pos, then [cls, post_quant_conv(f_hat) + resampled pos] + pos 0, + level embeddings
    d = "decoder.model"
    z = F.conv2d(torch.cat(fhats, 1), state["post_quant_conv.weight"], state["post_quant_conv.bias"])
    z = z.flatten(2).transpose(1, 2)
    N, pos = (s["image_size"] // p) ** 2, state[f"{d}.pos_embed"]
    cls = state[f"{d}.cls_token"].expand(B, -1, -1)
    x = torch.cat([cls, state["decoder.mask_token"].expand(B, N, -1)], 1) + pos
    zz = torch.cat([cls + pos[:, :1], z + _resampled(pos, K)], 1)
    x = torch.cat([x, zz], 1) + state["decoder.lvl_embed.weight"][state["decoder.lvl1LC"][0]]
    x = _official_vit(state, d, x, depth, heads)[:, 1:1 + N]
    x = F.linear(x, state["decoder.to_pixel.model.weight"], state["decoder.to_pixel.model.bias"])
    g = int(N**0.5)
    recon = torch.einsum("nhwpqc->nchpwq", x.reshape(B, g, g, p, p, 3)).reshape(B, 3, g * p, g * p)
    return f, codes, recon.clamp(-1, 1)


def _nontrivial_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A random official state whose gammas, level embeddings, latent tokens and positions all matter."""
    g = torch.Generator().manual_seed(3)
    state = random_checkpoint("imagefolder", seed=5)
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.endswith("gamma"):
            value = 0.5 + torch.rand(value.shape, generator=g)
        elif any(n in key for n in ("lvl_embed", "latent_tokens", "mask_token", "cls_token", "pos_embed")):
            value = torch.randn(value.shape, generator=g) * 0.5
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            value = 1 + 0.2 * torch.randn(value.shape, generator=g)
        else:
            value = value * 10  # weights of about unit gain at width 32
        state[key] = value.to(dtype)
    return state


@pytest.mark.numerics
def test_folded_model_computes_the_official_forward_in_float64():
    variant = load_manifest("imagefolder")["tiny-test"]
    state = _nontrivial_state(torch.float64)
    config = imagefolder_config(variant)
    model = ImageFolder(config).double().eval()
    model.load_state_dict(imagefolder_state(state, config), strict=True)
    images = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1)
    f, codes, recon = _official_forward(state, variant.settings, images)
    with torch.no_grad():
        assert_same_maths(model.encode_latents(images), f, what="encoder outputs")
        mine = model.encode_codes(images)
        per_scale = model.codes_per_scale(mine)
        for si, pn in enumerate(variant.settings["v_patch_nums"]):
            for b in range(2):
                assert torch.equal(per_scale[si][:, b].reshape(3, -1), codes[b][si]), (si, b)
        assert len(set(mine.flatten().tolist())) > 3  # the codes vary: the comparison is not of constants
        assert_same_maths(model.decode_codes(mine).clamp(-1, 1), recon, what="reconstructions")
    assert recon.std() > 0.1


def test_layerscale_and_level_embeddings_are_not_ignored():
    """The folded constants carry what they should: changing a gamma or a level embedding in the official
    state changes the converted model's output."""
    variant = load_manifest("imagefolder")["tiny-test"]
    config = imagefolder_config(variant)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def latents(state):
        model = ImageFolder(config).eval()
        model.load_state_dict(imagefolder_state(state, config))
        with torch.no_grad():
            return model.encode_latents(images)

    base = _nontrivial_state(torch.float32)
    reference = latents(base)
    for key in ("encoder.model.blocks.1.ls2.gamma", "encoder.lvl_embed.weight"):
        changed = dict(base)
        changed[key] = base[key] * 2
        assert not torch.allclose(latents(changed), reference, atol=1e-4), key


# ---- the published layouts and what is refused --------------------------------------------------------------

@pytest.mark.parametrize("variant", [n for n, v in load_manifest("imagefolder").items() if not v.test_only])
def test_published_imagefolder_layouts_map_exactly(variant):
    config = check_published_layout("imagefolder", variant, imagefolder_config, imagefolder_state, ImageFolder)
    codes = int(variant.removeprefix("imagefolder-"))
    q = config.quantizer
    assert (q.num_codes, q.code_dim, q.branches, q.scales, q.match) == (codes, 32, 2, PAPER_SCALES, "cosine")
    assert (config.image_size, config.patch_size, config.latent_grid, config.encoder.width, config.decoder.depth) \
        == (256, 16, 11, 768, 12)
    assert config.codes_per_image == 572 and config.num_latent_tokens == 242


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("encoder.model.blocks.1.ls1.gamma"), "missing key 'encoder.model.blocks.1.ls1.gamma'"),
    (lambda s: s.__setitem__("decoder.extra", torch.zeros(3)), "extra key 'decoder.extra'"),
    (lambda s: s.__setitem__("quantizes.1.embedding.weight", torch.zeros(64, 5)),
     "key 'quantizes.1.embedding.weight' has shape [64, 5], the layout has [64, 8]"),
])
def test_bad_keys_are_refused_naming_the_key(tmp_path, capsys, damage, named):
    state = random_checkpoint("imagefolder")
    damage(state)
    path = tmp_path / "bad.pt"
    torch.save({"ema": state, "args": argparse.Namespace(x=1)}, path)
    code, out, err = run(["convert", "--from", "imagefolder", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_level_buffers_of_another_layout_are_refused(tmp_path):
    state = random_checkpoint("imagefolder")
    state["encoder.lvl1LC"] = torch.zeros_like(state["encoder.lvl1LC"])
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(TextokError, match="encoder.lvl1LC does not give the released level layout"):
        convert("imagefolder", path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_argparse_namespace_is_the_one_class_allowed(tmp_path):
    """Training checkpoints store their arguments as an argparse.Namespace: it loads (and the model or EMA state
    beside it is found); any other class, also inside the Namespace, is still refused."""
    weights = {"w": torch.ones(2)}
    good = tmp_path / "good.pt"
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-4, scales=[1, 2])}, good)
    state, container = read_checkpoint(good, (("ema",), ("model",)))
    assert container == ("model",) and torch.equal(state["w"], weights["w"])
    bad = tmp_path / "bad.pt"
    torch.save({"model": weights, "args": argparse.Namespace(out=pathlib.PurePosixPath("/x"))}, bad)
    with pytest.raises(TextokError, match="needs arbitrary code to load"):
        read_published(bad)
