"""`textok convert --from imagefolder-var`: ImageFolder's released folded VAR generator.

A random checkpoint of the manifest's test size (the official layout with two branches of 64 codes x 8 channels,
scales 1, 1, 2, 3, depth 2), wrapped as the official trainer saves it, is converted through the CLI with a tiny
textok ImageFolder tokenizer, loaded and sampled through `textok sample`. The published depths map exactly on the
meta device. The fold is checked by what it means (branch p's logits are the head's rows p V ..; branch 1's inputs
are channels C .. 2C), the two build-dependent entries (empty_emb, an xformers-padded mask) are settled, and bad
checkpoints are refused naming the key. (Agreement with the official code: benchmarks/results/convert-equivalence.md.)
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from convert_checkpoints import check_published_layout, random_checkpoint, run
from textok.convert import convert, load_manifest
from textok.convert.var import prepare_imagefolder_var, var_config, var_state
from textok.errors import TextokError
from textok.models.imagefolder import ImageFolder, ImageFolderConfig
from textok.models.multiscale import PAPER_SCALES
from textok.models.registry import load_generator
from textok.models.var import VAR, VARConfig, VARSamplerConfig
from textok.models.vqvae import VQVAE, VQVAEConfig

FMT = "imagefolder-var"


def training_checkpoint(var_state_dict: dict) -> dict:
    """What the official train.py saves: epoch, the trainer's state (the VAR at var_wo_ddp, the tokenizer at
    vae_local, the optimizer) and the Args' state_dict (an OrderedDict of plain values)."""
    args = OrderedDict(depth=2, pn="1_1_2_3", patch_nums=(1, 1, 2, 3), v_patch_nums=[1, 1, 2, 3], cfg=3.25,
                       top_k=750, top_p=0.95, p_drop=0.0, product_quant=2, encoder_model="vit_base", seed=None)
    return {"epoch": 350, "iter": 0, "args": args,
            "trainer": {"config": {"patch_nums": (1, 1, 2, 3), "resos": (16, 16, 32, 48), "label_smooth": 0.0,
                                   "prog_it": 0, "last_prog_si": -1, "first_prog": True},
                        "var_wo_ddp": var_state_dict,
                        "vae_local": {"quantizes.0.embedding.weight": torch.zeros(64, 8)},
                        "var_opt": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}}}


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    """textok's tiny ImageFolder (two branches of 64 codes x 8 channels) on the release's kind of schedule: a
    repeated first scale."""
    base = ImageFolderConfig.preset("imagefolder-tiny")
    config = dataclasses.replace(base, quantizer=dataclasses.replace(base.quantizer, scales=(1, 1, 2, 3)))
    return Path(ImageFolder(config).save_pretrained(tmp_path / "tok"))


def _save(tmp_path: Path, state: dict, name: str = "imagenet-var-tiny.pt") -> Path:
    path = tmp_path / name
    torch.save(training_checkpoint(state), path)
    return path


def test_converts_from_the_training_checkpoint_and_samples(tokenizer_dir, tmp_path, capsys):
    state = random_checkpoint(FMT)
    path = _save(tmp_path, state)
    out_dir = tmp_path / "var"
    code, out, err = run(["convert", "--from", FMT, path, "--out", out_dir, "--tokenizer", tokenizer_dir], capsys)
    assert code == 0, err
    assert "tiny-test" in out and "--cfg 4.25 --top-k 750 --top-p 0.95" in out  # README's cfg 3.25 in VAR's terms
    model, record = load_generator(out_dir)
    c = model.config
    assert (c.branches, c.fold, c.codebook_size, c.code_dim, c.scales, c.depth) == (2, True, 64, 8, (1, 1, 2, 3), 2)
    assert c.sampler == VARSamplerConfig(cfg=4.25, top_k=750, top_p=0.95)
    assert record["latents_meta"]["code_shape"] == [2, 15]
    assert record["converted_from"]["format"] == FMT and record["converted_from"]["file"] == path.name
    torch.testing.assert_close(model.head.weight, state["head.weight"])
    torch.testing.assert_close(model.word_embed.weight, state["word_embed.weight"])
    code, out, err = run(["sample", "--generator", out_dir, "--class", 3, "--n", 2, "--out", tmp_path / "s.png"],
                         capsys)
    assert code == 0 and (tmp_path / "s.png").is_file() and "guidance 4.25" in out, err


def _converted(state: dict) -> VAR:
    model = VAR(var_config(load_manifest(FMT)["tiny-test"]))
    model.load_state_dict(var_state(state, model.config))
    return model.eval()


def test_branch_p_reads_head_rows_p_and_input_channels_p():
    """The official head's 2 V outputs are chunked per branch (branch 0 first) and its 2 C inputs are branch 0's
    f_hat then branch 1's: a bias that makes code 5 win in rows V.. must show in branch 1 only, and zeroed input
    columns C.. must make the logits blind to branch 1's inputs."""
    state = random_checkpoint(FMT)
    V, C = 64, 8
    state["head.bias"][V + 5] = 100.0
    state["word_embed.weight"][:, C:] = 0
    model = _converted(state)
    inputs, labels = torch.randn(2, 14, 2 * C), torch.tensor([1, 4])
    with torch.no_grad():
        logits = model(inputs, labels)
        other = inputs.clone()
        other[..., C:] = torch.randn(2, 14, C)
        moved = model(other, labels)
    assert (logits[:, 1].argmax(-1) == 5).all() and not (logits[:, 0].argmax(-1) == 5).all()
    torch.testing.assert_close(logits, moved, rtol=0, atol=0)
    assert not torch.allclose(model(inputs.flip(-1), labels), logits)


def _pad_mask(state: dict, fill_pad=float("-inf")) -> dict:
    """The mask as the official constructor builds it where xformers is installed: padded to a multiple of 8."""
    mask = state["attn_bias_for_masking"]
    L, Lp = mask.shape[-1], (mask.shape[-1] + 7) // 8 * 8
    padded = torch.full((1, 1, Lp, Lp), fill_pad)
    padded[..., :L, :L] = mask
    padded[..., L:, L:] = 0
    return {**state, "attn_bias_for_masking": padded}


def test_xformers_mask_and_empty_emb_are_settled(tokenizer_dir, tmp_path):
    """A build with xformers (padded mask) and --p_drop > 0 (empty_emb) converts to the same model; a padding
    that is not xformers' is refused."""
    state = random_checkpoint(FMT)
    plain = convert(FMT, _save(tmp_path, state, "a.pt"), tmp_path / "a", tokenizer=tokenizer_dir).model
    other = {**_pad_mask(state), "empty_emb.weight": torch.randn(1, 64)}
    assert other["attn_bias_for_masking"].shape[-1] == 16
    built = convert(FMT, _save(tmp_path, other, "b.pt"), tmp_path / "b", tokenizer=tokenizer_dir).model
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), built.state_dict().values()))
    with pytest.raises(TextokError, match="padding is not xformers'"):
        prepare_imagefolder_var(_pad_mask(state, fill_pad=0.0))
    with pytest.raises(TextokError, match="'empty_emb.weight' has shape"):
        prepare_imagefolder_var({**state, "empty_emb.weight": torch.zeros(2, 64)})


@pytest.mark.parametrize("variant", [n for n, v in load_manifest(FMT).items() if not v.test_only])
def test_published_layouts_map_exactly(variant):
    config = check_published_layout(FMT, variant, var_config, var_state, VAR)
    depth = int(variant.removeprefix("imagefolder-var-d"))
    assert (config.depth, config.width, config.heads) == (depth, 64 * depth, depth)
    assert (config.branches, config.fold, config.codebook_size, config.code_dim) == (2, True, 4096, 32)
    assert config.scales == PAPER_SCALES and config.sampler == VARSamplerConfig()  # the paper's sampler
    if depth == 17:  # the paper's generator is textok's preset over imagefolder-b-256's codes
        preset = VARConfig.preset("var-imagefolder-b-256")
        fields = ("scales", "branches", "codebook_size", "code_dim", "num_classes", "width", "depth", "heads",
                  "mlp_ratio", "attn_l2_norm", "shared_adaln", "drop_path_rate")
        assert [getattr(preset, f) for f in fields] == [getattr(config, f) for f in fields]


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("blocks.1.attn.v_bias"), "missing key 'blocks.1.attn.v_bias'"),
    (lambda s: s.__setitem__("blocks.0.extra", torch.zeros(3)), "extra key 'blocks.0.extra'"),
    (lambda s: s.__setitem__("head.weight", torch.zeros(64, 64)),
     "key 'head.weight' has shape [64, 64], the layout has [128, 64]"),
])
def test_bad_keys_are_refused_naming_the_key(tokenizer_dir, tmp_path, capsys, damage, named):
    state = random_checkpoint(FMT)
    damage(state)
    path = _save(tmp_path, state)
    code, out, err = run(["convert", "--from", FMT, path, "--out", tmp_path / "out", "--tokenizer", tokenizer_dir],
                         capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_wrong_file_or_tokenizer_is_refused(tokenizer_dir, tmp_path):
    state = random_checkpoint(FMT)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)  # a plain state dict is not the release's training checkpoint
    with pytest.raises(TextokError, match=r"no weights at \['trainer'\]\['var_wo_ddp'\]"):
        convert(FMT, bare, tmp_path / "g", tokenizer=tokenizer_dir)
    path = _save(tmp_path, state)
    vqvae = VQVAE(VQVAEConfig.preset("vqvae-tiny")).save_pretrained(tmp_path / "vq")
    with pytest.raises(TextokError, match="give the converted ImageFolder tokenizer"):
        convert(FMT, path, tmp_path / "g", tokenizer=vqvae)
    other = ImageFolder(ImageFolderConfig.preset("imagefolder-tiny")).save_pretrained(tmp_path / "t3")  # 1, 2, 3
    with pytest.raises(TextokError, match=r"models \(\[1, 1, 2, 3\], 2, 64, 8\)"):
        convert(FMT, path, tmp_path / "g", tokenizer=other)
    assert not (tmp_path / "g").exists()
    saved = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    assert saved["model_type"] == "imagefolder"
