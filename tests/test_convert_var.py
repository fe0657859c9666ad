"""`textok convert --from var-vqvae / var`: FoundationVision VAR's VQVAE and transformers.

A random checkpoint of each manifest's test size (the official layout at 64 px, 4 scales, depth 2) is converted
through the CLI, loaded by the verbs (info, reconstruct, eval reconstruction, sample) and run. The published
sizes map exactly on the meta device. The reordering of the adaLN rows is checked by what it means (zero gates
make a block the identity; a head scale of -1 makes every position's logits the same), and bad checkpoints are
refused naming the key. (Agreement with the official code: benchmarks/results/convert-equivalence.md.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert_checkpoints import check_info_and_reconstruct, check_published_layout, random_checkpoint, run
from textok.convert import convert, load_manifest
from textok.convert.var import var_config, var_state, vqvae_config, vqvae_state
from textok.errors import ConfigError, TextokError
from textok.models.registry import load_generator, load_tokenizer
from textok.generate.sampling import GenerationPipeline
from textok.models.var import VAR, VARConfig, VARSamplerConfig
from textok.models.vqvae import VQVAE, VQVAEConfig


@pytest.fixture
def vqvae_dir(tmp_path) -> Path:
    path = tmp_path / "vae_tiny.pth"
    torch.save(random_checkpoint("var-vqvae"), path)
    return convert("var-vqvae", path, tmp_path / "vqvae").directory


def test_vqvae_converts_and_the_tokenizer_verbs_load_it(tmp_path, capsys):
    path = tmp_path / "vae_tiny.pth"
    state = random_checkpoint("var-vqvae")
    torch.save(state, path)
    out_dir = tmp_path / "vqvae"
    code, out, err = run(["convert", "--from", "var-vqvae", path, "--out", out_dir], capsys)
    assert code == 0, err
    assert "tiny-test" in out and "textok eval reconstruction --model" in out
    record = json.loads((out_dir / "config.json").read_text())
    assert record["model_type"] == "vqvae" and record["converted_from"]["format"] == "var-vqvae"
    model = load_tokenizer(out_dir).eval()
    assert model.config.quantizer.match == "euclidean" and model.scales == (1, 2, 3, 4)
    torch.testing.assert_close(model.quantizer.branches[0].embedding.weight, state["quantize.embedding.weight"])
    phi = model.quantizer.branches[0].phis[3].conv.bias
    torch.testing.assert_close(phi, state["quantize.quant_resi.qresi_ls.3.bias"])
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        codes = model.encode_codes(images)
        recon = model.decode_codes(codes)
    assert codes.shape == (2, 1, 1 + 4 + 9 + 16) and recon.shape == images.shape and torch.isfinite(recon).all()
    check_info_and_reconstruct(out_dir, 64, tmp_path, capsys, info_says="quantizer")


def test_eval_reconstruction_runs_on_the_converted_vqvae(vqvae_dir, tmp_path, capsys):
    code, out, err = run(["eval", "reconstruction", "--model", vqvae_dir, "--data", "scenes", "--num", "2",
                          "--fd-size", "32", "--quiet", "--out", tmp_path / "e.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["num_images"] == 2 and 0 < result["PSNR"] < 40  # random weights: a poor, finite reconstruction


@pytest.mark.parametrize("variant", ["tiny-test", "tiny-test-saln"])
def test_var_converts_and_samples_through_textok_sample(vqvae_dir, tmp_path, capsys, variant):
    path = tmp_path / "var_tiny.pth"
    torch.save(random_checkpoint("var", variant), path)
    out_dir = tmp_path / "var"
    code, out, err = run(["convert", "--from", "var", path, "--out", out_dir, "--tokenizer", vqvae_dir], capsys)
    assert code == 0, err
    assert "--cfg 2.5 --top-k 900 --top-p 0.96" in out  # the README's FID sampler, cfg 1.5 in VAR's terms
    model, record = load_generator(out_dir)
    assert record["latents_meta"]["tokenizer_dir"] == str(vqvae_dir.resolve())
    assert record["latents_meta"]["code_shape"] == [1, 30]
    assert (model.config.branches, model.config.attn_l2_norm, model.config.depth) == (1, True, 2)
    assert model.config.shared_adaln == (variant == "tiny-test-saln")
    assert ("shared_adaln" in json.loads((out_dir / "config.json").read_text())["config"]) == model.config.shared_adaln
    assert model.config.sampler == VARSamplerConfig(cfg=2.5, top_k=900, top_p=0.96)  # stored as its default
    code, out, err = run(["sample", "--generator", out_dir, "--class", 3, "--n", 2, "--out", tmp_path / "s.png"],
                         capsys)
    assert code == 0 and (tmp_path / "s.png").is_file() and "guidance 2.5" in out, err
    sampler = GenerationPipeline(out_dir, device="cpu").model.config.sampler
    assert (sampler.top_k, sampler.top_p) == (900, 0.96)


def _converted_var(state: dict[str, torch.Tensor], variant: str = "tiny-test") -> VAR:
    v = load_manifest("var")[variant]
    model = VAR(var_config(v))
    model.load_state_dict(var_state(state, model.config))
    return model.eval()


@pytest.mark.parametrize("variant", ["tiny-test", "tiny-test-saln"])
def test_zero_official_gates_make_every_block_the_identity(variant):
    """VAR's adaLN rows are gamma1, gamma2, scale1, scale2, shift1, shift2: zero gammas (the first two chunks)
    must switch the blocks off in the converted model, whatever the attention and MLP weights. With shared adaLN
    the gammas are the shared projection's plus each block's ``ada_gss`` offset."""
    state = random_checkpoint("var", variant)
    D = state["word_embed.weight"].shape[0]
    shared = variant == "tiny-test-saln"
    gates = ["shared_ada_lin.1.weight", "shared_ada_lin.1.bias"] if shared else \
        [f"blocks.{i}.ada_lin.1.{p}" for i in range(2) for p in ("weight", "bias")]
    for key in gates:
        state[key][: 2 * D] = 0
    if shared:
        for i in range(2):
            state[f"blocks.{i}.ada_gss"][0, 0, :2] = 0
    other = dict(state)
    for key in state:
        if ".attn." in key or ".ffn." in key:
            other[key] = state[key] + 1.0
    a, b = _converted_var(state, variant), _converted_var(other, variant)
    inputs, labels = torch.randn(2, 29, 8), torch.tensor([1, 4])
    torch.testing.assert_close(a(inputs, labels), b(inputs, labels), rtol=0, atol=0)
    live = "blocks.0.ada_gss" if shared else "blocks.0.ada_lin.1.bias"  # a live gamma1 brings block 0 back
    for s in (state, other):
        s[live] = s[live].clone()
        if shared:
            s[live][0, 0, 0] = 0.5
        else:
            s[live][:D] = 0.5
    a, b = _converted_var(state, variant), _converted_var(other, variant)
    assert not torch.allclose(a(inputs, labels), b(inputs, labels))


def test_head_scale_of_minus_one_gives_the_shift_everywhere():
    """The head's adaLN rows are scale, shift: scale = -1 multiplies the normalised features by 0, so every
    position's logits become head(shift), the same for all positions."""
    state = random_checkpoint("var")
    D = state["word_embed.weight"].shape[0]
    state["head_nm.ada_lin.1.weight"][:D] = 0
    state["head_nm.ada_lin.1.bias"][:D] = -1
    logits = _converted_var(state)(torch.randn(2, 29, 8), torch.tensor([1, 4]))
    torch.testing.assert_close(logits, logits[:, :, :1].expand_as(logits), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", [n for n, v in load_manifest("var").items() if not v.test_only])
def test_published_var_layouts_map_exactly(variant):
    config = check_published_layout("var", variant, var_config, var_state, VAR)
    depth = int(variant.removeprefix("var-d"))
    assert (config.depth, config.width, config.heads, config.codebook_size) == (depth, 64 * depth, depth, 4096)
    assert config.shared_adaln == (depth == 36) and config.scales[-1] == (32 if depth == 36 else 16)


@pytest.mark.parametrize("variant", ["vae-ch160-v4096-z32", "vae-ch160-v4096-z32-512"])
def test_published_vqvae_layout_maps_exactly(variant):
    """One released file, two schedules: 256 px (the default match) and VAR-d36's 512 px (--variant)."""
    config = check_published_layout("var-vqvae", variant, vqvae_config, vqvae_state, VQVAE)
    if variant.endswith("512"):
        assert config.image_size == 512 and config.quantizer.scales == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    else:
        assert config == VQVAEConfig.preset("var-vqvae-256")


@pytest.mark.parametrize("fmt, damage, named", [
    ("var", lambda s: s.pop("blocks.1.attn.q_bias"), "missing key 'blocks.1.attn.q_bias'"),
    ("var", lambda s: s.__setitem__("blocks.0.extra", torch.zeros(3)), "extra key 'blocks.0.extra'"),
    ("var", lambda s: s.__setitem__("head.weight", torch.zeros(64, 63)),
     "key 'head.weight' has shape [64, 63], the layout has [64, 64]"),
    ("var-vqvae", lambda s: s.pop("quantize.quant_resi.qresi_ls.2.weight"),
     "missing key 'quantize.quant_resi.qresi_ls.2.weight'"),
])
def test_bad_keys_are_refused_naming_the_key(vqvae_dir, tmp_path, capsys, fmt, damage, named):
    state = random_checkpoint(fmt)
    damage(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    extra = ["--tokenizer", vqvae_dir] if fmt == "var" else []
    code, out, err = run(["convert", "--from", fmt, path, "--out", tmp_path / "out", *extra], capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_var_needs_its_vqvae_and_consistent_buffers(vqvae_dir, tmp_path):
    path = tmp_path / "var_tiny.pth"
    state = random_checkpoint("var")
    torch.save(state, path)
    with pytest.raises(TextokError, match="give --tokenizer DIR"):
        convert("var", path, tmp_path / "g")
    other = VQVAE(VQVAEConfig.preset("vqvae-tiny").override(["quantizer.num_codes=32"])).save_pretrained(tmp_path / "o")
    with pytest.raises(TextokError, match="give the converted VQVAE it was released with"):
        convert("var", path, tmp_path / "g", tokenizer=other)
    state["lvl_1L"] = torch.zeros_like(state["lvl_1L"])
    torch.save(state, path)
    with pytest.raises(TextokError, match="lvl_1L / attn_bias_for_masking buffers do not describe the scales"):
        convert("var", path, tmp_path / "g", tokenizer=vqvae_dir)
    assert not (tmp_path / "g").exists()


def test_stored_sampler_is_left_out_of_configs_at_its_default():
    """VAR configs saved before the stored sampler existed compare equal; a changed one round-trips."""
    assert "sampler" not in VARConfig().to_dict() and "shared_adaln" not in VARConfig().to_dict()
    custom = VARConfig.preset("var-tiny").override(["sampler.top_k=9"])
    assert custom.to_dict()["sampler"]["top_k"] == 9 and VARConfig.from_dict(custom.to_dict()) == custom
    with pytest.raises(ConfigError, match="must be >= 1"):
        VARConfig.preset("var-tiny").override(["sampler.cfg=0.5"])


@pytest.mark.parametrize("variant", [n for n, v in load_manifest("var").items() if not v.test_only])
def test_var_presets_are_the_released_layouts(variant):
    """`--config var-d16` (for train-generator over VQVAE codes) is the layout the release converts to."""
    converted = var_config(load_manifest("var")[variant])
    preset = VARConfig.preset(variant)
    fields = ("scales", "branches", "codebook_size", "code_dim", "num_classes", "width", "depth", "heads",
              "mlp_ratio", "attn_l2_norm", "shared_adaln", "drop_path_rate")
    assert [getattr(preset, f) for f in fields] == [getattr(converted, f) for f in fields]
