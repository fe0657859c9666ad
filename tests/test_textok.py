import pytest
import torch

from conftest import random_text
from numerics import assert_same_maths, rounding_tolerance
from textok import TexTok, TexTokConfig
from textok.errors import CheckpointMismatchError, TextokError


@pytest.mark.parametrize("name", TexTokConfig.presets())
def test_every_preset_shapes_and_params(name):
    cfg = TexTokConfig.preset(name)
    with torch.device("meta"):
        model = TexTok(cfg)
    counts = model.num_parameters()
    if name.startswith("textok-b-"):
        # the paper: ViT-B encoder + ViT-B decoder, ~176M parameters together
        assert 165e6 < counts["total"] < 185e6, counts
        assert abs(counts["encoder"] - counts["decoder"]) < 2e6
    B = 2
    x = torch.empty(B, 3, cfg.image_size, cfg.image_size, device="meta")
    text = random_text(B, dim=cfg.text_dim).to("meta")
    recon, z = model(x, text)
    assert z.shape == (B, cfg.num_tokens, cfg.token_channels)
    assert recon.shape == x.shape


def test_gradients_reach_every_parameter(tiny_cfg):
    torch.manual_seed(0)
    model = TexTok(tiny_cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, _ = model(x, random_text(2, dim=tiny_cfg.text_dim, lengths=[3, 6]))
    ((recon - x) ** 2).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_text_off_ignores_caption_and_text_on_uses_it(tiny_cfg):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t1, t2 = random_text(2, seed=1), random_text(2, seed=2)
    off = TexTok(tiny_cfg.override(["text_in_encoder=false", "text_in_decoder=false"])).eval()
    assert torch.equal(off(x, t1)[0], off(x, t2)[0])
    assert torch.equal(off(x)[0], off(x, t1)[0])  # and needs none
    on = TexTok(tiny_cfg).eval()
    assert not torch.allclose(on(x, t1)[0], on(x, t2)[0])
    # per side: encoder-only text changes Z; decoder-only text leaves Z alone but changes pixels
    enc = TexTok(tiny_cfg.override(["text_in_decoder=false"])).eval()
    assert not torch.allclose(enc.encode(x, t1), enc.encode(x, t2))
    dec = TexTok(tiny_cfg.override(["text_in_encoder=false"])).eval()
    z = dec.encode(x)
    assert not torch.allclose(dec.decode(z, t1), dec.decode(z, t2))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_text_padding_does_not_change_output(tiny_cfg):
    # float64: the padded text makes a longer key sequence than the unpadded one
    torch.manual_seed(0)
    model = TexTok(tiny_cfg).eval().double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    text = random_text(2, length=5, lengths=[3, 5]).to(dtype=torch.float64)
    padded = text.pad_to(11)
    padded.states[:, 5:] = torch.randn_like(padded.states[:, 5:]) * 100  # garbage in padded slots
    a, b = model(x, text)[0], model(x, padded)[0]
    assert_same_maths(b, a, what="padded text")
    # garbage inside the masked tail of the shorter caption is ignored too
    text2 = random_text(2, length=5, lengths=[3, 5]).to(dtype=torch.float64)
    text2.states[0, 3:] = 1e3
    assert_same_maths(model(x, text2)[0], model(x, text)[0], what="garbage in the masked tail")
    # ...while a real token does matter
    text2.states[0, 0] += 1.0
    assert (model(x, text2)[0] - a).abs().max() > rounding_tolerance(x.dtype) * a.abs().max()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_save_load_round_trip_is_bit_exact(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = TexTok(tiny_cfg).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    loaded = TexTok.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == tiny_cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    t = random_text(1)
    assert torch.equal(model(x, t)[0], loaded(x, t)[0])


def test_loading_into_another_config_names_the_fields(tiny_cfg, tmp_path):
    TexTok(tiny_cfg).save_pretrained(tmp_path / "m")
    other = tiny_cfg.override(["num_tokens=8", "encoder.width=48"])
    with pytest.raises(CheckpointMismatchError, match="num_tokens: 4 != 8") as err:
        TexTok.from_pretrained(tmp_path / "m", config=other)
    assert "encoder.width" in str(err.value)


def test_loading_another_model_type_is_refused(tiny_cfg, tmp_path):
    import json

    TexTok(tiny_cfg).save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    data["model_type"] = "dit"
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    with pytest.raises(TextokError, match="config.json does not match the sha256"):  # edited after saving
        TexTok.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "SHA256SUMS").unlink()  # what the message says to do after an edit on purpose
    with pytest.raises(CheckpointMismatchError, match="holds a 'dit' model"):
        TexTok.from_pretrained(tmp_path / "m")
    with pytest.raises(TextokError, match="config.json is missing"):
        TexTok.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_are_clear(tiny_cfg):
    model = TexTok(tiny_cfg)
    with pytest.raises(TextokError, match=r"takes \(batch, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 32, 32), random_text(1))
    with pytest.raises(TextokError, match=r"takes \(batch, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 1, 16, 16), random_text(1))
    with pytest.raises(TextokError, match="conditioned on text"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(TextokError, match="2 captions for 1 images"):
        model.encode(torch.zeros(1, 3, 16, 16), random_text(2))
    with pytest.raises(TextokError, match="text_dim=384"):
        model.encode(torch.zeros(1, 3, 16, 16), random_text(1, dim=16))
    with pytest.raises(TextokError, match="decodes"):
        model.decode(torch.zeros(1, 5, 4), random_text(1))
    with pytest.raises(TextokError, match="not a single string"):
        model.encode(torch.zeros(1, 3, 16, 16), "a caption")


def test_flops_count_matches_a_direct_count():
    from textok.models.vit import ViTConfig, transformer_flops

    cfg = ViTConfig(width=64, depth=2, heads=4)
    L = 10
    # per layer: qkv 3d^2 + proj d^2 + mlp 8d^2 multiply-adds per token, attention 2 L^2 d
    macs = 2 * (L * (3 + 1 + 8) * 64 * 64 + 2 * L * L * 64)
    assert transformer_flops(cfg, L) == 2 * macs
