"""`textok convert`: published checkpoints -> textok model directories.

Each format's committed manifest (the official key names and shapes) builds a random checkpoint of its test
size, which is converted through the CLI, loaded by the verbs and run. The published sizes are checked on the
meta device: the manifest's layout maps onto exactly the textok model its settings describe. Checkpoints with
a missing, extra or mis-shaped key, pickles that need code, and malformed manifests are refused in one line.
(Agreement with the official code itself is measured outside the suite: benchmarks/results/convert-equivalence.md.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convert_checkpoints import check_info_and_reconstruct, check_published_layout, random_checkpoint, run
from textok.cli import main
from textok.convert import FORMATS, convert, load_manifest
from textok.convert.manifest import parse_manifest
from textok.convert.titok import titok_config, titok_state
from textok.errors import ConfigError, TextokError
from textok.models.registry import load_tokenizer
from textok.models.textok import LAYOUT_DEFAULTS, TexTokConfig
from textok.models.titok import TiTok, TiTokConfig


@pytest.fixture
def titok_file(tmp_path) -> Path:
    path = tmp_path / "tokenizer_titok_tiny.bin"
    torch.save(random_checkpoint("titok"), path)
    return path


def test_help_lists_every_format(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    for name in FORMATS:
        assert f"{name}:" in out
    assert "titok-l-32" in out and "titok-b-64" in out and "titok-s-128" in out
    assert "tiny-test" not in out  # the test size is not a published variant


def test_titok_converts_and_every_verb_loads_it(titok_file, tmp_path, capsys):
    out_dir = tmp_path / "converted"
    code, out, err = run(["convert", "--from", "titok", titok_file, "--out", out_dir], capsys)
    assert code == 0, err
    assert "tiny-test" in out and "textok eval reconstruction --model" in out
    record = json.loads((out_dir / "config.json").read_text())
    assert record["model_type"] == "titok"
    assert record["converted_from"]["format"] == "titok" and record["converted_from"]["variant"] == "tiny-test"
    assert record["converted_from"]["published_settings"]["vq_model"]["num_latent_tokens"] == 4
    assert len(record["converted_from"]["sha256"]) == 64
    model = load_tokenizer(out_dir).eval()
    assert model.config.stage == "decoder-finetune" and not model.config.vqgan.with_encoder
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes = model.encode_codes(images)
        recon = model.decode_codes(codes)
    assert codes.shape == (2, 4) and recon.shape == images.shape and torch.isfinite(recon).all()
    # the saved weights are the converted ones: a second conversion of the same file is identical
    again = convert("titok", titok_file, tmp_path / "again").model
    torch.testing.assert_close(again.state_dict()["decoder.class_token"], model.state_dict()["decoder.class_token"])
    check_info_and_reconstruct(out_dir, 32, tmp_path, capsys, info_says="vqgan")


def test_safetensors_and_folder_sources(tmp_path):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    save_file(random_checkpoint("titok"), str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    done = convert("titok", folder, tmp_path / "out")
    assert done.variant.name == "tiny-test"


@pytest.mark.parametrize("variant", [n for n, v in load_manifest("titok").items() if not v.test_only])
def test_published_titok_layouts_map_exactly(variant):
    """The full-size releases, on the meta device: the manifest's keys map one to one onto the textok TiTok
    their published settings describe, with every shape right."""
    config = check_published_layout("titok", variant, titok_config, titok_state,
                                    lambda c: TiTok(c, load_vqgan=False))
    assert config.image_size == 256 and config.patch_size == 16
    if "vae" in variant:  # the single-stage releases: a pixel head, a KL bottleneck of 16 channels
        assert (config.quantizer.kind, config.token_channels, config.pixel_conv) == ("kl", 16, True)
    elif "vq8k" in variant:  # ... or a VQ of 8192 codes of 64 channels without l2 normalisation
        assert (config.quantizer.num_codes, config.token_channels, config.quantizer.l2_normalized) == (8192, 64, False)
        assert config.pixel_conv and not config.uses_vqgan
    else:  # the two-stage releases: 4096 l2-normalised codes decoded through the MaskGIT-VQGAN
        assert config.quantizer.num_codes == 4096 and config.uses_vqgan and config.legacy_token_layout


@pytest.mark.parametrize("variant", ["tiny-test-vq8k", "tiny-test-vae"])
def test_single_stage_titok_converts_and_decodes(tmp_path, capsys, variant):
    """TiTok's VQ-8k / VAE releases (pixel head, no VQGAN) convert from their own layout and reconstruct."""
    path = tmp_path / "tokenizer.bin"
    torch.save(random_checkpoint("titok", variant), path)
    out_dir = tmp_path / "converted"
    code, out, err = run(["convert", "--from", "titok", path, "--out", out_dir], capsys)
    assert code == 0 and variant in out, err
    model = load_tokenizer(out_dir).eval()
    assert model.config.pixel_conv and not model.config.uses_vqgan and not model.config.legacy_token_layout
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, z = model(images)
    assert recon.shape == images.shape and z.shape == (2, 4, 6) and torch.isfinite(recon).all()
    assert model.is_discrete == (variant == "tiny-test-vq8k")


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("encoder.ln_pre.weight"), "missing key 'encoder.ln_pre.weight'"),
    (lambda s: s.__setitem__("encoder.extra.bias", torch.zeros(3)), "extra key 'encoder.extra.bias'"),
    (lambda s: s.__setitem__("quantize.embedding.weight", torch.zeros(32, 7)),
     "key 'quantize.embedding.weight' has shape [32, 7], the layout has [32, 6]"),
])
def test_bad_keys_are_refused_naming_the_key(tmp_path, capsys, damage, named):
    state = random_checkpoint("titok")
    damage(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    code, out, err = run(["convert", "--from", "titok", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_variant_and_wrong_format_are_refused(titok_file, tmp_path):
    with pytest.raises(TextokError, match="no variant 'titok-xl'"):
        convert("titok", titok_file, tmp_path / "o", variant="titok-xl")
    with pytest.raises(TextokError, match="does not have the published titok layout of titok-l-32: missing key"):
        convert("titok", titok_file, tmp_path / "o", variant="titok-l-32")
    with pytest.raises(TextokError, match="unknown format 'dit-xl'"):
        convert("dit-xl", titok_file, tmp_path / "o")


class RunsCode:
    """Unpickling this would call touch() on a file: a pickle that needs arbitrary code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_that_needs_code_is_refused_and_never_run(tmp_path, capsys):
    witness = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"encoder.ln_pre.weight": RunsCode(str(witness))}, path)
    code, out, err = run(["convert", "--from", "titok", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "needs arbitrary code to load" in err and "weights_only=True" in err
    assert len(err.strip().splitlines()) == 1
    assert not witness.exists()


def test_output_over_other_files_is_refused(titok_file, tmp_path):
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(TextokError):
        convert("titok", titok_file, precious)
    assert (precious / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("data, named", [
    ([], "needs a \"format\""),
    ({"format": "x", "variants": {"a": {"keys": {}}}}, "variant 'a' has no \"keys\""),
    ({"format": "x", "variants": {"a": {"keys": {"w": [2, "3"]}}}}, "key 'w' has shape"),
    ({"format": "x", "variants": {}}, "lists no variants"),
])
def test_malformed_manifests_are_refused(data, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("(", r"\(")):
        parse_manifest(data, "bad.json")


def test_layout_options_leave_textok_defaults_unchanged():
    """Configs written before the layout options existed compare equal: the options appear only when set."""
    for cfg in (TexTokConfig(), TiTokConfig.preset("titok-b-64")):
        assert not set(LAYOUT_DEFAULTS) & set(cfg.to_dict())
    custom = TexTokConfig.preset("textok-tiny").override(["class_token=true", "norm_eps=1e-5"])
    assert custom.to_dict()["class_token"] is True and TexTokConfig.from_dict(custom.to_dict()) == custom


def test_legacy_token_layout_changes_the_tokens():
    cfg = TiTokConfig.preset("titok-tiny").override(["text_in_encoder=false"])
    torch.manual_seed(0)
    plain = TiTok(cfg).eval()
    legacy = TiTok(cfg.override(["legacy_token_layout=true"])).eval()
    legacy.load_state_dict(plain.state_dict())
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    z_plain = plain.encoder(images, None)
    z_legacy = legacy.encoder(images, None)
    assert z_plain.shape == z_legacy.shape and not torch.allclose(z_plain, z_legacy)


def test_vqgan_without_encoder_says_so():
    from textok.models.maskgit_vqgan import MaskGITVQGAN, MaskGITVQGANConfig

    vqgan = MaskGITVQGAN(MaskGITVQGANConfig.preset("maskgit-vqgan-tiny").override(["with_encoder=false"]))
    with pytest.raises(TextokError, match="has no encoder"):
        vqgan.encode_to_codes(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="needs the VQGAN's encoder"):
        TiTokConfig.preset("titok-tiny").override(["patch_size=4", "vqgan.channel_mult=[1,2,2]",
                                                   "vqgan.with_encoder=false", "stage=proxy-codes"])


# ---- generators ----------------------------------------------------------------------------------
@pytest.fixture
def converted_titok(titok_file, tmp_path) -> Path:
    return convert("titok", titok_file, tmp_path / "titok").directory


@pytest.mark.parametrize("variant", ["tiny-test", "tiny-test-uvit"])
def test_maskgit_converts_and_samples(converted_titok, tmp_path, capsys, variant):
    from textok.models.registry import load_generator

    path = tmp_path / "generator.bin"
    torch.save(random_checkpoint("titok-maskgit", variant), path)
    out_dir = tmp_path / "maskgit"
    code, out, err = run(["convert", "--from", "titok-maskgit", path, "--out", out_dir, "--tokenizer",
                          converted_titok], capsys)
    assert code == 0, err
    assert "textok sample --generator" in out and "guidance 3.0" in out  # the release's w = 2 is textok's 3
    model, record = load_generator(out_dir)
    assert record["latents_meta"]["tokenizer_dir"] == str(converted_titok.resolve())
    assert model.config.long_skips == (variant == "tiny-test-uvit")
    assert model.config.post_norm == (variant == "tiny-test")
    assert (model.config.sampler.steps, model.config.sampler.guidance_scale) == (4, 3.0)
    code, out, err = run(["sample", "--generator", out_dir, "--class", 1, "--n", 2, "--steps", 4,
                          "--out", tmp_path / "s.png"], capsys)
    assert code == 0 and (tmp_path / "s.png").is_file(), err


@pytest.mark.parametrize("variant", [n for n, v in load_manifest("titok-maskgit").items() if not v.test_only])
def test_published_maskgit_layouts_map_exactly(variant):
    from textok.convert.maskgit import maskgit_config, maskgit_state
    from textok.models.maskgit import MaskGIT

    config = check_published_layout("titok-maskgit", variant, maskgit_config, maskgit_state, MaskGIT)
    assert (config.codebook_size, config.num_classes) == (4096, 1000)


def test_generator_needs_a_matching_tokenizer(converted_titok, tmp_path):
    path = tmp_path / "generator.bin"
    torch.save(random_checkpoint("titok-maskgit"), path)
    with pytest.raises(TextokError, match="give --tokenizer DIR"):
        convert("titok-maskgit", path, tmp_path / "g")
    other = TiTok(TiTokConfig.preset("titok-tiny")).save_pretrained(tmp_path / "other")  # 4 tokens over 64 codes
    with pytest.raises(TextokError, match="models 4 tokens over 32 codes"):
        convert("titok-maskgit", path, tmp_path / "g", tokenizer=other)
    assert not (tmp_path / "g").exists()


def test_long_skips_need_an_odd_depth():
    from textok.models.maskgit import MaskGITConfig

    with pytest.raises(ConfigError, match="odd transformer.depth"):
        MaskGITConfig.preset("maskgit-tiny").override(["long_skips=true"])
    assert not {"long_skips", "post_norm", "norm_pre"} & set(MaskGITConfig.preset("maskgit-b").to_dict())


def test_output_is_never_the_source_or_another_projects_model(tmp_path):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    torch.save(random_checkpoint("titok"), snapshot / "pytorch_model.bin")
    (snapshot / "config.json").write_text('{"model": {"vq_model": {}}}')  # 1d-tokenizer's own config
    before = sorted(p.name for p in snapshot.iterdir())
    with pytest.raises(TextokError, match="which this command reads"):
        convert("titok", snapshot, snapshot)
    other = tmp_path / "other_snapshot"
    other.mkdir()
    (other / "config.json").write_text('{"architectures": ["Foo"]}')
    with pytest.raises(TextokError, match="config.json that textok did not write"):
        convert("titok", snapshot, other)
    assert sorted(p.name for p in snapshot.iterdir()) == before and (other / "config.json").is_file()
    convert("titok", snapshot, tmp_path / "fresh")
    convert("titok", snapshot, tmp_path / "fresh")  # textok's own output is replaced


# ---- TA-TiTok ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer CLIP text tower (context 8, width 16) with a letter-level BPE vocabulary,
    saved like a real one: the shape of the manifest's TA-TiTok test size."""
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    letters = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=8).save_pretrained(d)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(d)
    return d


def test_clip_encoder_returns_the_full_context(tiny_clip_dir):
    from textok.text.encoders import load_text_encoder

    emb = load_text_encoder(f"clip:{tiny_clip_dir}", 8).encode(["a red", "blue sky"])
    assert emb.states.shape == (2, 8, 16) and bool(emb.mask.all())
    # padding is id 0 after the end token, as open_clip pads: the states there are those of token 0
    enc = load_text_encoder(f"clip:{tiny_clip_dir}", 8)
    ids = torch.tensor([[52, 26, 53, 0, 0, 0, 0, 0]])  # <start> "a</w>" <end>, then zeros
    with torch.no_grad():
        direct = enc.model(input_ids=ids).last_hidden_state
    one = enc.encode(["a"]).states
    torch.testing.assert_close(one, direct)


@pytest.mark.parametrize("variant", ["tiny-test", "tiny-test-vae"])
def test_tatitok_converts_and_decodes_with_captions(tmp_path, capsys, tiny_clip_dir, variant):
    path = tmp_path / "tatitok.bin"
    torch.save(random_checkpoint("tatitok", variant), path)
    out_dir = tmp_path / "tatitok"
    code, out, err = run(["convert", "--from", "tatitok", path, "--out", out_dir, "--text-encoder",
                          f"clip:{tiny_clip_dir}"], capsys)
    assert code == 0, err
    model = load_tokenizer(out_dir).eval()
    c = model.config
    assert c.text_in_decoder and not c.text_in_encoder and c.text_positions == 8 and c.text_dim == 16
    assert c.quantizer.kind == ("vq" if variant == "tiny-test" else "kl")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.encode(images)
        right = model.decode(z, ["red bird", "blue sky"])
        swapped = model.decode(z, ["blue sky", "red bird"])
    assert right.shape == images.shape and not torch.allclose(right, swapped)  # the text reaches the pixels
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(img)
    code, out, err = run(["reconstruct", "--model", out_dir, "--image", img, "--caption", "a red bird",
                          "--out", tmp_path / "r.png"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("variant", [n for n, v in load_manifest("tatitok").items() if not v.test_only])
def test_published_tatitok_layouts_map_exactly(variant):
    config = check_published_layout("tatitok", variant, lambda v: titok_config(v, "clip:/clip-vit-large-patch14-336"),
                                    titok_state, lambda c: TiTok(c, load_vqgan=False))
    assert config.text_positions == 77 and config.text_dim == 768


def test_tatitok_needs_its_text_encoder(tmp_path, titok_file):
    path = tmp_path / "tatitok.bin"
    torch.save(random_checkpoint("tatitok"), path)
    with pytest.raises(ConfigError, match="give --text-encoder clip:"):
        convert("tatitok", path, tmp_path / "o")
    with pytest.raises(TextokError, match="has no text: drop --text-encoder"):
        convert("titok", titok_file, tmp_path / "o", text_encoder="clip:/x")
