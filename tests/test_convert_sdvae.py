"""`textok convert --from sd-vae`: Stable Diffusion's VAE as diffusers saves it (AutoencoderKL).

A random checkpoint of the manifest's test size (the released layout: 4 levels, attention in the middle, 4 latent
channels, at 32 px) is converted through the CLI from a snapshot folder and loaded by the tokenizer verbs (info,
reconstruct, eval reconstruction, extract-latents, train-generator --kind dit, sample). Files with the older
diffusers attention names convert to the same model; the published sizes map exactly on the meta device; a float64
restatement of diffusers' forward over the official names agrees with the converted model; bad checkpoints and
foreign config.json files are refused. (Agreement with diffusers itself: benchmarks/results/convert-equivalence.md.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from convert_checkpoints import check_info_and_reconstruct, check_published_layout, random_checkpoint, run
from numerics import assert_same_maths
from textok.convert import convert, load_manifest
from textok.convert.sdvae import sdvae_config, sdvae_state
from textok.errors import TextokError
from textok.models.registry import load_tokenizer
from textok.models.sdvae import SDVAE, SDVAEConfig

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def snapshot(folder: Path, state: dict[str, torch.Tensor], **config) -> Path:
    """A Hub-like snapshot folder: the weights and diffusers' config.json (the release's keys, ``config`` over)."""
    folder.mkdir(parents=True)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    s = load_manifest("sd-vae")["tiny-test"].settings
    release = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2",
               **{k: v for k, v in s.items() if k not in ("image_size", "scaling_factor")}}
    (folder / "config.json").write_text(json.dumps({**release, **config}))
    return folder


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for new, old in LEGACY.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = value
    return out


@pytest.fixture
def sdvae_dir(tmp_path) -> Path:
    return convert("sd-vae", snapshot(tmp_path / "snap", random_checkpoint("sd-vae")), tmp_path / "sdvae").directory


def test_sd_vae_converts_from_a_snapshot_and_the_tokenizer_verbs_load_it(tmp_path, capsys):
    state = random_checkpoint("sd-vae")
    folder = snapshot(tmp_path / "sd-vae-ft-mse", state, scaling_factor=0.13025)
    out_dir = tmp_path / "sdvae"
    code, out, err = run(["convert", "--from", "sd-vae", folder, "--out", out_dir], capsys)
    assert code == 0, err
    assert "tiny-test" in out and "textok eval reconstruction --model" in out
    record = json.loads((out_dir / "config.json").read_text())
    assert record["model_type"] == "sdvae" and record["converted_from"]["file"] == "diffusion_pytorch_model.safetensors"
    settings = record["converted_from"]["published_settings"]
    assert settings["settings_from"] == "config.json" and settings["scaling_factor"] == 0.13025  # the file's own
    model = load_tokenizer(out_dir).eval()
    assert isinstance(model, SDVAE) and model.config == SDVAEConfig.preset("sdvae-tiny")
    torch.testing.assert_close(model.decoder.up[3].block[0].conv1.weight,
                               state["decoder.up_blocks.0.resnets.0.conv1.weight"])
    torch.testing.assert_close(model.encoder.down[1].block[0].nin_shortcut.weight,
                               state["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"])
    with torch.no_grad():
        z = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
        recon = model.decode(z)
    assert z.shape == (2, 16, 4) and recon.shape == (2, 3, 32, 32) and torch.isfinite(recon).all()
    check_info_and_reconstruct(out_dir, 32, tmp_path, capsys, info_says="16 tokens x 4 channels")


def test_a_lone_weights_file_records_the_manifest_settings(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(random_checkpoint("sd-vae"), path)
    record = json.loads((convert("sd-vae", path, tmp_path / "out").directory / "config.json").read_text())
    settings = record["converted_from"]["published_settings"]
    assert settings["settings_from"] == "manifest" and settings["scaling_factor"] == 0.18215


def test_older_attention_names_convert_to_the_same_model(tmp_path):
    state = random_checkpoint("sd-vae")
    path = tmp_path / "legacy.bin"
    torch.save(legacy_names(state), path)
    done = convert("sd-vae", path, tmp_path / "legacy")
    assert done.variant.name == "tiny-test-legacy"
    current = convert("sd-vae", snapshot(tmp_path / "snap", state), tmp_path / "current").model
    for (name, a), (_, b) in zip(done.model.state_dict().items(), current.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_tokens_run_through_extract_latents_a_dit_and_sample(sdvae_dir, tmp_path, capsys):
    code, out, err = run(["extract-latents", "--tokenizer", sdvae_dir, "--num", "8", "--batch-size", "4", "--out",
                          tmp_path / "lat", "--no-progress"], capsys)
    assert code == 0 and "8 x (16, 4) continuous tokens" in out, err
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert (meta["tokenizer_type"], meta["discrete"], meta["num_tokens"], meta["channels"]) == ("sdvae", False, 16, 4)
    code, out, err = run(["train-generator", "--latents", tmp_path / "lat", "--out", tmp_path / "gen", "--kind", "dit",
                          "--max-steps", "1", "--config", "dit-tiny", "--no-progress", "model.width=32",
                          "model.depth=1", "model.heads=2", "batch_size=4"], capsys)
    assert code == 0, err
    code, out, err = run(["sample", "--generator", tmp_path / "gen" / "final", "--class", "1", "--n", "1", "--steps",
                          "2", "--out", tmp_path / "s.png", "--no-progress"], capsys)
    assert code == 0 and (tmp_path / "s.png").is_file(), err


def test_eval_reconstruction_runs_on_the_converted_vae(sdvae_dir, tmp_path, capsys):
    code, out, err = run(["eval", "reconstruction", "--model", sdvae_dir, "--data", "scenes", "--num", "2",
                          "--fd-size", "32", "--quiet", "--out", tmp_path / "e.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["num_images"] == 2 and 0 < result["PSNR"] < 40  # random weights: a poor, finite reconstruction


@pytest.mark.parametrize("variant", [n for n, v in load_manifest("sd-vae").items() if not v.test_only])
def test_published_sd_vae_layouts_map_exactly(variant):
    """One release, two names for its attention (current / older diffusers) and two image sizes (256 / 512 px)."""
    config = check_published_layout("sd-vae", variant, sdvae_config, sdvae_state, SDVAE)
    assert config == SDVAEConfig.preset("sdvae-512" if variant.endswith("-512") else "sdvae-256")


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("decoder.up_blocks.2.upsamplers.0.conv.bias"),
     "missing key 'decoder.up_blocks.2.upsamplers.0.conv.bias'"),
    (lambda s: s.__setitem__("encoder.mid_block.attentions.0.to_k.scale", torch.zeros(3)),
     "extra key 'encoder.mid_block.attentions.0.to_k.scale'"),
    (lambda s: s.__setitem__("quant_conv.weight", torch.zeros(8, 8, 3, 3)),
     "key 'quant_conv.weight' has shape [8, 8, 3, 3], the layout has [8, 8, 1, 1]"),
])
def test_bad_keys_are_refused_naming_the_key(tmp_path, capsys, damage, named):
    state = random_checkpoint("sd-vae")
    damage(state)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    code, out, err = run(["convert", "--from", "sd-vae", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, named", [
    ({"norm_num_groups": 16}, "says norm_num_groups=16 but the sd-vae layout tiny-test has 8"),
    ({"act_fn": "gelu"}, "says act_fn='gelu'"),
    ({"_class_name": "UNet2DModel"}, "is not an AutoencoderKL config"),
])
def test_a_config_json_of_another_autoencoder_is_refused(tmp_path, capsys, config, named):
    folder = snapshot(tmp_path / "snap", random_checkpoint("sd-vae"), **config)
    code, out, err = run(["convert", "--from", "sd-vae", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def official_forward(state: dict[str, torch.Tensor], images: torch.Tensor, levels: int, blocks: int,
                     groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' AutoencoderKL restated over its own key names: (posterior mean (B, 4, K, K), decode(mean))."""

    def conv(h, name, **kw):
        return F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], **kw)

    def norm(h, name):
        return F.group_norm(h, groups, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def resnet(h, name):
        y = conv(F.silu(norm(h, f"{name}.norm1")), f"{name}.conv1", padding=1)
        y = conv(F.silu(norm(y, f"{name}.norm2")), f"{name}.conv2", padding=1)
        return (conv(h, f"{name}.conv_shortcut") if f"{name}.conv_shortcut.weight" in state else h) + y

    def attention(h, name):
        B, C, H, W = h.shape
        x = norm(h, f"{name}.group_norm").reshape(B, C, H * W).transpose(1, 2)
        q, k, v = (F.linear(x, state[f"{name}.{p}.weight"], state[f"{name}.{p}.bias"])
                   for p in ("to_q", "to_k", "to_v"))
        weights = torch.softmax(q @ k.transpose(1, 2) / C**0.5, dim=-1)
        out = F.linear(weights @ v, state[f"{name}.to_out.0.weight"], state[f"{name}.to_out.0.bias"])
        return h + out.transpose(1, 2).reshape(B, C, H, W)

    def middle(h, name):
        return resnet(attention(resnet(h, f"{name}.resnets.0"), f"{name}.attentions.0"), f"{name}.resnets.1")

    h = conv(images, "encoder.conv_in", padding=1)
    for i in range(levels):
        for j in range(blocks):
            h = resnet(h, f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down_blocks.{i}.downsamplers.0.conv", stride=2)
    h = conv(F.silu(norm(middle(h, "encoder.mid_block"), "encoder.conv_norm_out")), "encoder.conv_out", padding=1)
    mean = conv(h, "quant_conv").chunk(2, dim=1)[0]
    h = middle(conv(conv(mean, "post_quant_conv"), "decoder.conv_in", padding=1), "decoder.mid_block")
    for i in range(levels):  # up_blocks.0 is the lowest resolution
        for j in range(blocks + 1):
            h = resnet(h, f"decoder.up_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up_blocks.{i}.upsamplers.0.conv",
                     padding=1)
    return mean, conv(F.silu(norm(h, "decoder.conv_norm_out")), "decoder.conv_out", padding=1)


@pytest.mark.numerics
def test_the_converted_model_computes_the_official_forward_in_float64():
    """Every renamed key and the fused q/k/v projections, checked against diffusers' computation restated over the
    official names; the query and key weights are scaled up so that attention is far from uniform."""
    state = {k: v.double() for k, v in random_checkpoint("sd-vae", seed=3).items()}
    for side in ("encoder", "decoder"):
        for part in ("to_q", "to_k"):
            state[f"{side}.mid_block.attentions.0.{part}.weight"] *= 40
    v = load_manifest("sd-vae")["tiny-test"]
    model = SDVAE(sdvae_config(v)).double().eval()
    model.load_state_dict(sdvae_state(state, model.config))
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = v.settings
    mean, recon = official_forward(state, images, len(s["block_out_channels"]), s["layers_per_block"],
                                   s["norm_num_groups"])
    with torch.no_grad():
        tokens = model.encode(images)
        assert_same_maths(tokens, mean.flatten(2).transpose(1, 2), torch.float64, "posterior mean")
        assert_same_maths(model.decode(tokens), recon, torch.float64, "reconstruction")
    swapped, name = dict(state), "decoder.mid_block.attentions.0"  # the check sees the order of q and k
    for part in ("weight", "bias"):
        swapped[f"{name}.to_q.{part}"], swapped[f"{name}.to_k.{part}"] = (state[f"{name}.to_k.{part}"],
                                                                          state[f"{name}.to_q.{part}"])
    model.load_state_dict(sdvae_state(swapped, model.config))
    with torch.no_grad(), pytest.raises(AssertionError, match="differ by"):
        assert_same_maths(model.decode(tokens), recon, torch.float64, "reconstruction")


def diffusers_names(ldm: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A CompVis-layout state under diffusers' names (the correspondence diffusers' own conversion uses)."""
    out = {}
    for key, value in ldm.items():
        key = re.sub(r"encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
        key = re.sub(r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
        key = re.sub(r"decoder\.up\.(\d+)\.block\.",
                     lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", key)
        key = re.sub(r"decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", key)
        key = key.replace("nin_shortcut", "conv_shortcut").replace("mid.block_1", "mid_block.resnets.0")
        key = key.replace("mid.block_2", "mid_block.resnets.1").replace("norm_out", "conv_norm_out")
        if ".mid.attn_1." in key:
            part = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
            name, kind = key.split(".mid.attn_1.")[1].rsplit(".", 1)
            key = key.split(".mid.attn_1.")[0] + f".mid_block.attentions.0.{part[name]}.{kind}"
            value = value[..., 0, 0] if value.dim() == 4 else value
        out[key] = value
    return out


@pytest.mark.numerics
def test_the_compvis_layout_converts_to_the_official_forward(tmp_path):
    """sd-vae-ft-*-original: a latent-diffusion training checkpoint ({"state_dict": ...} with its loss module and EMA
    counters beside the autoencoder) converts, and computes the forward restated over diffusers' names (float64)."""
    state = random_checkpoint("sd-vae", "tiny-test-original", seed=4)
    for side in ("encoder", "decoder"):
        for part in ("q", "k"):
            state[f"{side}.mid.attn_1.{part}.weight"] *= 40
    extras = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4),
              "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    path = tmp_path / "vae-ft-mse-840000-ema-pruned.ckpt"
    torch.save({"state_dict": {**state, **extras}, "global_step": 7}, path)
    done = convert("sd-vae", path, tmp_path / "out")
    assert done.variant.name == "tiny-test-original"
    s = done.variant.settings
    model = done.model.double()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    levels = len(s["block_out_channels"])
    reference = {k: v.double() for k, v in diffusers_names(state, levels).items()}
    assert len(reference) == len(state) and set(reference) <= set(load_manifest("sd-vae")["tiny-test"].keys)
    mean, recon = official_forward(reference, images, levels, s["layers_per_block"], s["norm_num_groups"])
    with torch.no_grad():
        tokens = model.encode(images)
        assert_same_maths(tokens, mean.flatten(2).transpose(1, 2), torch.float64, "posterior mean")
        assert_same_maths(model.decode(tokens), recon, torch.float64, "reconstruction")
    state["model_ema.encoderconv_inweight"] = torch.zeros(3)  # EMA weights are not a counter: refused, named
    torch.save({"state_dict": state}, path)
    with pytest.raises(TextokError, match="extra key 'model_ema.encoderconv_inweight'"):
        convert("sd-vae", path, tmp_path / "out2")


def test_a_wrong_file_is_refused(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(TextokError, match="does not have the published sd-vae layout"):
        convert("sd-vae", path, tmp_path / "out")
