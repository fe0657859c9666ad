"""`textok convert --from dit`: facebookresearch DiT-XL/2 (256 and 512 px) over a VAE's latent grid.

A random checkpoint of the manifest's test size (the official layout over a 4 x 4 x 4 latent grid, patch 2,
depth 2) is converted through the CLI over a tiny tokenizer of 16 tokens x 4 channels and sampled through
`textok sample`. The published sizes map exactly on the meta device. The patch-2 model with 2D positions is
proven in float64 against a functional restatement of the official forward written here (the official guidance
of 3 of the 4 channels included), and bad checkpoints and tokenizers are refused naming the problem.
(Agreement with the official code: benchmarks/results/convert-equivalence.md.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convert_checkpoints import check_published_layout, official_dit_pos_embed, random_checkpoint, run
from numerics import assert_same_maths
from textok.convert import convert, load_manifest
from textok.convert.dit import LATENT_SCALE, dit_config, dit_state
from textok.errors import ConfigError, TextokError
from textok.models.dit import DiT, DiTConfig
from textok.models.registry import load_generator
from textok.models.textok import TexTok, TexTokConfig

TINY = load_manifest("dit")["tiny-test"].settings


def _tokenizer(tmp_path: Path, num_tokens: int = 16, channels: int = 4, name: str = "tok") -> Path:
    config = TexTokConfig.preset("textok-tiny").override({"num_tokens": num_tokens, "token_channels": channels,
                                                               "text_in_encoder": False, "text_in_decoder": False})
    return Path(TexTok(config).save_pretrained(tmp_path / name))


@pytest.fixture
def tok_dir(tmp_path) -> Path:
    return _tokenizer(tmp_path)


def test_dit_converts_and_samples_through_textok_sample(tok_dir, tmp_path, capsys):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(random_checkpoint("dit"), path)
    out_dir = tmp_path / "dit"
    code, out, err = run(["convert", "--from", "dit", path, "--out", out_dir, "--tokenizer", tok_dir], capsys)
    assert code == 0, err
    assert "250 DDPM steps, --cfg 4" in out and "FID at 1.5" in out and "channels 0-2" in out
    model, record = load_generator(out_dir)
    c = model.config
    assert (c.num_tokens, c.in_channels, c.patch_size, c.guided_channels, c.seq_len) == (16, 4, 2, 3, 4)
    meta = record["latents_meta"]
    assert meta["tokenizer_dir"] == str(tok_dir.resolve()) and not meta["discrete"]
    assert meta["mean"] == [0.0] * 4 and meta["std"] == pytest.approx([1 / 0.18215] * 4)
    diffusion = record["diffusion"]
    assert (diffusion["objective"], diffusion["num_timesteps"], diffusion["beta_schedule"]) == ("ddpm", 1000, "linear")
    assert (diffusion["learn_sigma"], diffusion["sampler"], diffusion["sampling_steps"]) == (True, "ddpm", 250)
    assert record["converted_from"]["textok_sampler"]["guided_channels"] == 3
    saved = json.loads((out_dir / "config.json").read_text())["config"]
    assert saved["patch_size"] == 2 and saved["guided_channels"] == 3
    code, out, err = run(["sample", "--generator", out_dir, "--class", 3, "--n", 2, "--steps", 5, "--out",
                          tmp_path / "s.png"], capsys)
    assert code == 0 and (tmp_path / "s.png").is_file() and "guidance 4" in out, err
    code, out, err = run(["info", out_dir], capsys)  # a generator directory: its size, tokenizer and origin
    params = sum(p.numel() for p in model.parameters())
    assert code == 0 and f"a dit generator, {params:,} parameters" in out, err
    assert f"tokenizer: {tok_dir.resolve()}" in out and "--from dit, variant tiny-test" in out


def test_dit_samples_through_the_converted_sd_vae(tmp_path, capsys):
    """The release's pair: the SD VAE converted with --from sd-vae decodes the converted DiT's latents."""
    vae = tmp_path / "vae.bin"
    torch.save(random_checkpoint("sd-vae"), vae)
    vae_dir = convert("sd-vae", vae, tmp_path / "sdvae").directory
    path = tmp_path / "DiT-tiny.pt"
    torch.save(random_checkpoint("dit"), path)
    code, out, err = run(["convert", "--from", "dit", path, "--out", tmp_path / "dit", "--tokenizer", vae_dir], capsys)
    assert code == 0, err
    assert load_generator(tmp_path / "dit")[1]["latents_meta"]["tokenizer_type"] == "sdvae"
    code, out, err = run(["sample", "--generator", tmp_path / "dit", "--class", 1, "--n", 1, "--steps", 3, "--out",
                          tmp_path / "s.png", "--no-progress"], capsys)
    assert code == 0 and (tmp_path / "s.png").is_file(), err
    record = json.loads((vae_dir / "config.json").read_text())
    record["converted_from"]["published_settings"]["scaling_factor"] = 0.13025  # SDXL's VAE
    (vae_dir / "config.json").write_text(json.dumps(record))
    (vae_dir / "SHA256SUMS").unlink()  # an edited config.json loads unchecked
    with pytest.raises(TextokError, match="latents scaled by 0.13025, but DiT was trained on sd-vae-ft latents"):
        convert("dit", path, tmp_path / "dit2", tokenizer=vae_dir)


def test_the_latents_are_unscaled_by_dit_s_factor_before_decoding(tok_dir, tmp_path, monkeypatch):
    """What the diffusion returns is the VAE's latent times 0.18215: the tokenizer must decode it divided by that."""
    path = tmp_path / "DiT-tiny.pt"
    torch.save(random_checkpoint("dit"), path)
    convert("dit", path, tmp_path / "dit", tokenizer=tok_dir)
    from textok.generate.sampling import GenerationPipeline

    pipe = GenerationPipeline(tmp_path / "dit", device="cpu")
    fixed = torch.randn(1, 16, 4)
    seen = {}

    def decode(self, z, text=None):
        seen["z"] = z
        return torch.zeros(z.shape[0], 3, 16, 16)

    monkeypatch.setattr(type(pipe.tok), "decode", decode)
    monkeypatch.setattr("textok.diffusion.gaussian.GaussianDiffusion.sample", lambda self, *a, **k: fixed)
    pipe.generate(labels=[1], steps=2)
    torch.testing.assert_close(seen["z"], fixed / LATENT_SCALE)


@pytest.mark.parametrize("variant, side", [("dit-xl-2-256", 32), ("dit-xl-2-512", 64)])
def test_published_dit_layouts_map_exactly(variant, side):
    config = check_published_layout("dit", variant, dit_config, dit_state, DiT)
    assert (config.num_tokens, config.in_channels, config.patch_size, config.seq_len) == (side**2, 4, 2, side**2 // 4)
    assert (config.width, config.depth, config.heads, config.num_classes) == (1152, 28, 16, 1000)
    assert config.learn_sigma and config.guided_channels == 3 and config.text_dim == 0
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(config).parameters())
    assert 674e6 < params < 676e6  # the paper's 675M (the fixed pos_embed is no parameter here)


def _official_forward(state: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      s: dict) -> torch.Tensor:
    """models.py's DiT.forward restated: conv patch embedding, stored positions, [cos | sin] timestep features,
    adaLN-zero blocks (SiLU then one linear; shift, scale, gate x 2), tanh GELU, unpatchify 'nhwpqc->nchpwq'."""
    p, D, heads = s["patch_size"], s["hidden_size"], s["num_heads"]
    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)  # float32, as models.py
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    t_emb = F.linear(F.silu(F.linear(t_freq, state["t_embedder.mlp.0.weight"], state["t_embedder.mlp.0.bias"])),
                     state["t_embedder.mlp.2.weight"], state["t_embedder.mlp.2.bias"])
    c = F.silu(t_emb + state["y_embedder.embedding_table.weight"][y])

    def norm(a):
        return F.layer_norm(a, (D,), eps=1e-6)

    B, T, _ = h.shape
    for i in range(s["depth"]):
        b = f"blocks.{i}."
        mod = F.linear(c, state[b + "adaLN_modulation.1.weight"], state[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        a = norm(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = F.linear(a, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).reshape(
            B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, T, D), state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = h + mod[2][:, None] * att
        m = norm(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        m = F.gelu(F.linear(m, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + mod[5][:, None] * F.linear(m, state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
    shift, scale = F.linear(c, state["final_layer.adaLN_modulation.1.weight"],
                            state["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(norm(h) * (1 + scale[:, None]) + shift[:, None], state["final_layer.linear.weight"],
                   state["final_layer.linear.bias"])
    g, O = int(T**0.5), 2 * s["in_channels"]
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, O))
    return out.reshape(B, O, g * p, g * p)


def _official_forward_with_cfg(state, x, t, y, s, scale: float) -> torch.Tensor:
    """forward_with_cfg restated for the conditional half: channels [:3] guided, the rest conditional."""
    null = torch.full_like(y, s["num_classes"])
    out = _official_forward(state, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), s)
    cond, uncond = out.chunk(2)
    return torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)


@pytest.mark.numerics
def test_patch2_dit_computes_the_official_forward_in_float64():
    state = {k: v.double() * 10 for k, v in random_checkpoint("dit", seed=3).items()}  # adaLN and output live
    state["pos_embed"] = official_dit_pos_embed(TINY["hidden_size"], 2)[None]
    model = DiT(dit_config(load_manifest("dit")["tiny-test"])).double().eval()
    model.load_state_dict(dit_state(state, model.config))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    t, y = torch.tensor([0, 417, 999]), torch.tensor([2, 9, 10])  # 10 = the null class
    tokens = x.permute(0, 2, 3, 1).reshape(3, 16, 4)  # the latent grid row-major, as the VAE tokenizer gives it

    def grid(out: torch.Tensor) -> torch.Tensor:
        return out.reshape(3, 4, 4, -1).permute(0, 3, 1, 2)

    with torch.no_grad():
        expected = _official_forward(state, x, t, y, TINY)
        assert_same_maths(grid(model(tokens, t, y)), expected, torch.float64, "forward")
        labels = torch.tensor([2, 9, 4])
        guided = grid(model.forward_with_cfg(tokens, t, labels, cfg_scale=4.0))
        assert_same_maths(guided, _official_forward_with_cfg(state, x, t, labels, TINY, 4.0), torch.float64,
                          "forward_with_cfg")
    assert expected[:, 4:].abs().max() > 1e-3 and (guided - expected).abs().max() > 1e-3  # both parts are live


def test_textok_positions_are_the_official_table():
    """The stored pos_embed is checked against textok's 2D table: the same numbers as the official formula."""
    model = DiT(DiTConfig(num_tokens=64, in_channels=4, width=32, depth=1, heads=2, patch_size=2))
    assert_same_maths(model.pos_embed[0].double(), official_dit_pos_embed(32, 4), torch.float32, "pos_embed")


def test_patches_round_trip_and_the_default_layout_is_unchanged():
    model = DiT(DiTConfig(num_tokens=36, in_channels=3, width=32, depth=1, heads=2, patch_size=3, num_classes=2))
    x = torch.randn(2, 36, 3)
    patches = model.patchify(x)
    assert patches.shape == (2, 4, 27)
    torch.testing.assert_close(patches[0, 1], x[0].reshape(6, 6, 3)[0:3, 3:6].reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(model.unpatchify(patches), x, rtol=0, atol=0)
    assert "patch_size" not in DiTConfig().to_dict() and "guided_channels" not in DiTConfig().to_dict()
    assert DiT(DiTConfig.preset("dit-tiny")).x_embedder.weight.shape == (64, 8)


@pytest.mark.parametrize("override, message", [
    ({"patch_size": 2, "num_tokens": 15}, "square grid"),
    ({"patch_size": 3, "num_tokens": 16}, "square grid"),
    ({"guided_channels": 9}, "guided_channels=9"),
    ({"patch_size": 0}, "patch_size=0"),
])
def test_bad_patch_layouts_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        DiTConfig.preset("dit-tiny").override(override)


def test_guided_channels_guide_only_those():
    model = DiT(DiTConfig.preset("dit-tiny").override({"in_channels": 4, "guided_channels": 3})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x, t, y = torch.randn(2, 16, 4), torch.tensor([5, 500]), torch.tensor([1, 2])
        cond = model(x, t, y)
        uncond = model(x, t, None)
        guided = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
    torch.testing.assert_close(guided[..., :3], uncond[..., :3] + 3.0 * (cond[..., :3] - uncond[..., :3]))
    torch.testing.assert_close(guided[..., 3:], cond[..., 3:])


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("blocks.1.attn.qkv.bias"), "missing key 'blocks.1.attn.qkv.bias'"),
    (lambda s: s.__setitem__("blocks.0.extra", torch.zeros(3)), "extra key 'blocks.0.extra'"),
    (lambda s: s.__setitem__("x_embedder.proj.weight", torch.zeros(64, 4, 1, 1)),
     "key 'x_embedder.proj.weight' has shape [64, 4, 1, 1], the layout has [64, 4, 2, 2]"),
    (lambda s: s.__setitem__("pos_embed", s["pos_embed"].flip(1)), "pos_embed is not the fixed 2D sin-cos table"),
])
def test_bad_keys_are_refused_naming_the_key(tok_dir, tmp_path, capsys, damage, named):
    state = random_checkpoint("dit")
    damage(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    code, out, err = run(["convert", "--from", "dit", path, "--out", tmp_path / "out", "--tokenizer", tok_dir], capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_dit_needs_a_tokenizer_of_its_latent_grid(tmp_path):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(random_checkpoint("dit"), path)
    with pytest.raises(TextokError, match="give --tokenizer DIR"):
        convert("dit", path, tmp_path / "g")
    for tok in (_tokenizer(tmp_path, channels=8, name="c8"), _tokenizer(tmp_path, num_tokens=4, name="n4")):
        with pytest.raises(TextokError, match="this DiT models 16 x 4 continuous tokens; give the Stable Diffusion"):
            convert("dit", path, tmp_path / "g", tokenizer=tok)
    assert not (tmp_path / "g").exists()
