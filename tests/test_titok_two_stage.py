"""TiTok's two-stage recipe: the MaskGIT-VQGAN (published key layout, numerics on a tiny random one), stage 1
(cross-entropy against the frozen VQGAN's codes), stage 2 (decoder fine-tuned through the frozen VQGAN
decoder), a stage 1 -> stage 2 run through the training loop, and the refusals."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from textok.errors import CheckpointMismatchError, ConfigError, TextokError
from textok.models.maskgit_vqgan import MaskGITVQGAN, MaskGITVQGANConfig, ResBlock
from textok.models.registry import load_tokenizer, resolve_tokenizer_config
from textok.models.titok import TiTok, TiTokConfig
from textok.train.loop import param_groups
from textok.train.config import load_train_config
from textok.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VQGAN = MaskGITVQGANConfig.preset("maskgit-vqgan-tiny")  # 16 px -> 4 x 4 codes of 32, as titok-tiny's grid


def published_layout(h=128, mult=(1, 1, 2, 2, 4), blocks=2, z=256, codes=1024) -> dict[str, tuple[int, ...]]:
    """Key -> shape of maskgit-vqgan-imagenet-f16-256.bin, enumerated from 1d-tokenizer's
    modeling/modules/maskgit_vqgan.py (Encoder, Decoder, VectorQuantizer) as PretrainedTokenizer builds them."""
    shapes: dict[str, tuple[int, ...]] = {}

    def res(prefix: str, cin: int, cout: int) -> None:
        shapes.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
                       f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.norm2.weight": (cout,),
                       f"{prefix}.norm2.bias": (cout,), f"{prefix}.conv2.weight": (cout, cout, 3, 3)})
        if cin != cout:
            shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)

    levels, top = len(mult), h * mult[-1]
    shapes["encoder.conv_in.weight"] = (h, 3, 3, 3)
    ins = (1,) + tuple(mult)
    for i in range(levels):
        for j in range(blocks):
            res(f"encoder.down.{i}.block.{j}", h * (ins[i] if j == 0 else mult[i]), h * mult[i])
    for j in range(blocks):
        res(f"encoder.mid.{j}", top, top)
    shapes.update({"encoder.norm_out.weight": (top,), "encoder.norm_out.bias": (top,),
                   "encoder.conv_out.weight": (z, top, 1, 1), "encoder.conv_out.bias": (z,),
                   "decoder.conv_in.weight": (top, z, 3, 3), "decoder.conv_in.bias": (top,)})
    for j in range(blocks):
        res(f"decoder.mid.{j}", top, top)
    for i in range(levels):
        cin = top if i == levels - 1 else h * mult[i + 1]
        for j in range(blocks):
            res(f"decoder.up.{i}.block.{j}", cin if j == 0 else h * mult[i], h * mult[i])
        if i != 0:
            shapes[f"decoder.up.{i}.upsample_conv.weight"] = (h * mult[i], h * mult[i], 3, 3)
            shapes[f"decoder.up.{i}.upsample_conv.bias"] = (h * mult[i],)
    shapes.update({"decoder.norm_out.weight": (h * mult[0],), "decoder.norm_out.bias": (h * mult[0],),
                   "decoder.conv_out.weight": (3, h * mult[0], 3, 3), "decoder.conv_out.bias": (3,),
                   "quantize.embedding.weight": (codes, z)})
    return shapes


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors at a trained network's scales (unit-ish norms, 1/sqrt(fan-in) convs), so codes vary."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in layout.items():
        x = torch.randn(s, generator=g)
        if k.endswith("embedding.weight"):
            out[k] = x * 0.5
        elif len(s) == 4:
            out[k] = x / math.sqrt(math.prod(s[1:]))
        else:
            out[k] = (1.0 if "norm" in k and k.endswith("weight") else 0.0) + 0.1 * x
    return out


TINY_LAYOUT = dict(h=8, mult=(1, 1, 2), blocks=1, z=8, codes=32)


@pytest.fixture(scope="module")
def vqgan_file(tmp_path_factory):
    """A tiny random VQGAN in the published layout, as a .safetensors file."""
    path = tmp_path_factory.mktemp("vqgan") / "tiny-vqgan.safetensors"
    save_file(random_state(published_layout(**TINY_LAYOUT), seed=1), str(path))
    return path


def images(b: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def two_stage(stage: str, weights, *overrides: str, seed: int = 0) -> TiTok:
    torch.manual_seed(seed)
    cfg = TiTokConfig.preset("titok-tiny").override({"vqgan": TINY_VQGAN})
    return TiTok(cfg.override([f"stage={stage}", f"vqgan_weights={weights}", *overrides]))


# ---- the VQGAN ------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_published_layout_loads_every_tensor(tmp_path):
    """Random weights under the published key names and shapes, written as the released .bin
    (torch.save of a state dict), load strictly and land tensor by tensor."""
    layout = published_layout()
    assert len(layout) == 168 and sum(math.prod(s) for s in layout.values()) == 54_515_587
    state = random_state(layout)
    path = tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(state, path)
    vq = MaskGITVQGAN.from_file(path)
    own = vq.state_dict()
    assert set(own) == set(layout)
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert not any(p.requires_grad for p in vq.parameters())
    assert vq.config.downsample == 16 and vq.num_codes == 1024


def test_wrong_files_are_refused_in_one_line(tmp_path, vqgan_file):
    state = load_file(str(vqgan_file))
    renamed = {("quantizer.codebook" if k == "quantize.embedding.weight" else k): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(TextokError, match=r"1 missing \(e\.g\. quantize\.embedding\.weight\); 1 unexpected "
                                          r"\(e\.g\. quantizer\.codebook\)") as err:
        MaskGITVQGAN.from_file(tmp_path / "renamed.safetensors", TINY_VQGAN)
    assert "\n" not in str(err.value)
    with pytest.raises(TextokError, match=r"102 missing .*; 65 mis-shaped \(e\.g\. decoder\.conv_in\.bias: \(16,\) in "
                                          r"the file, \(512,\) here\)"):
        MaskGITVQGAN.from_file(vqgan_file)  # the published shape expected, a tiny file given
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(TextokError, match="cannot read MaskGIT-VQGAN weights"):
        MaskGITVQGAN.from_file(tmp_path / "junk.bin", TINY_VQGAN)
    with pytest.raises(TextokError, match="not found .* point vqgan_weights at it"):
        MaskGITVQGAN.from_file(tmp_path / "absent.bin", TINY_VQGAN)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_tiny_vqgan_codes_and_decoding(vqgan_file):
    vq = MaskGITVQGAN.from_file(vqgan_file, TINY_VQGAN).double()
    x = images().double()
    codes = vq.encode_to_codes(x)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert torch.equal(codes, vq.encode_to_codes(x))  # deterministic
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    # codes are the nearest codebook rows (squared l2) of the encoder's output on [0, 1] images
    z = vq.encoder((x + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(codes.flatten(), torch.cdist(z, vq.codebook()).argmin(1))
    assert len(codes.unique()) > 1
    out = vq.decode_codes(codes)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float64
    assert torch.equal(out, vq.decode_codes(codes.flatten(1)))  # (B, h*w) raster order == (B, h, w)
    # one-hot logits decode exactly as the codes (the soft path stage 2 trains through)
    soft = vq.decode_logits(F.one_hot(codes, 32).permute(0, 3, 1, 2).double() * 1e3)
    torch.testing.assert_close(soft, out, rtol=1e-12, atol=1e-12)
    with pytest.raises(TextokError, match=r"codes must lie in \[0, 32\)"):
        vq.decode_codes(torch.full((1, 4, 4), 32))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_resblock_projects_its_output_when_the_width_changes():
    """The published weights were trained with the residual taken from the block's output (JAX MaskGIT)."""
    torch.manual_seed(0)
    blk = ResBlock(8, 16, groups=4).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    h = blk.conv2(F.silu(blk.norm2(blk.conv1(F.silu(blk.norm1(x))))))
    torch.testing.assert_close(blk(x), h + blk.nin_shortcut(h), rtol=1e-12, atol=1e-12)


# ---- config -----------------------------------------------------------------------------------------
def test_stage_configs_are_checked_when_built(tmp_path):
    base = TiTokConfig.preset("titok-tiny").override({"vqgan": TINY_VQGAN})
    with pytest.raises(ConfigError, match=r"stage=proxy-codes needs the MaskGIT-VQGAN weights: set vqgan_weights="):
        base.override(["stage=proxy-codes"])
    with pytest.raises(ConfigError, match="not one of pixel, proxy-codes, decoder-finetune"):
        base.override(["stage=codes"])
    with pytest.raises(ConfigError, match=r"patch_size \(16\) must equal the VQGAN's downsampling \(4\)"):
        base.override(["patch_size=16", "stage=decoder-finetune", "vqgan_weights=w.bin"])
    a = base.override(["stage=proxy-codes", "vqgan_weights=w.bin"])  # any order
    b = base.override(["vqgan_weights=w.bin", "stage=proxy-codes"])
    assert a == b and a.uses_vqgan and TiTokConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    # the published-size presets resolve with the recipe's stage and a weight path (no model is built)
    _, cfg = resolve_tokenizer_config("titok-b-64", ["stage=proxy-codes", "vqgan_weights=/w.bin"])
    assert cfg.grid == 16 and cfg.vqgan.downsample == 16 and cfg.vqgan.num_codes == 1024
    assert TiTokConfig.preset("titok-b-64").stage == "pixel"
    # single-stage configs serialise as before the two-stage fields existed (old runs resume, files compare)
    assert not {"stage", "vqgan_weights", "vqgan"} & set(TiTokConfig.preset("titok-b-64").to_dict())
    assert {"stage", "vqgan_weights", "vqgan"} <= set(a.to_dict())


def test_recipes_need_the_weights(tmp_path):
    for name, stage in (("titok-stage1", "proxy-codes"), ("titok-stage2", "decoder-finetune")):
        recipe = load_train_config(name)
        assert recipe.model_overrides["stage"] == stage
        with pytest.raises(ConfigError, match="needs the MaskGIT-VQGAN weights: set vqgan_weights="):
            train_tokenizer(recipe, tmp_path / name, progress=False)
    s1 = load_train_config("titok-stage1")
    assert s1.loss.l2_weight == 0 and s1.loss.perceptual == "none" and s1.loss.adversarial.weight == 0


def test_stage1_refuses_pixel_losses_and_stage2_needs_init_from(tmp_path):
    base = ["model.patch_size=4", "model.vqgan.hidden_channels=8", "model.vqgan.channel_mult=[1,1,2]",
            "model.vqgan.norm_groups=4", "model.stage=proxy-codes", "model.vqgan_weights=w.bin"]
    with pytest.raises(ConfigError, match=r"loss\.l2_weight=1\.0, loss\.perceptual=opennsfw, "
                                          r"loss\.adversarial\.weight=0\.1 would train nothing"):
        # every pixel loss on (a tiny preset's own recipe trains with l2 only)
        pixel_losses = ["loss.perceptual=opennsfw", "loss.adversarial.weight=0.1"]
        train_tokenizer(load_train_config("titok-tiny", base + pixel_losses), tmp_path / "x", progress=False)
    stage2 = [o.replace("proxy-codes", "decoder-finetune") for o in base]
    with pytest.raises(ConfigError, match="set init_from=RUN/final"):
        train_tokenizer(load_train_config("titok-tiny", stage2), tmp_path / "y", progress=False)


# ---- stage 1 ----------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_stage1_loss_is_cross_entropy_over_the_vqgan_codebook(vqgan_file):
    model = two_stage("proxy-codes", vqgan_file).double()
    x = images().double()
    recon, terms = model.training_losses(x)
    # the same numbers from the public pieces, in float64
    target = model.vqgan.encode_to_codes(x)
    logits = model.decode_logits(model.encode(x))
    assert logits.shape == (3, 32, 4, 4)
    expected = -logits.log_softmax(1).gather(1, target[:, None]).mean()
    assert math.isclose(terms["proxy_codes"].item(), expected.item(), rel_tol=1e-10)
    assert math.isclose(terms["metric/code_accuracy"].item(), (logits.argmax(1) == target).double().mean().item(),
                        rel_tol=1e-6)  # a float32 metric
    torch.testing.assert_close(recon, model.vqgan.decode_codes(logits.argmax(1)), rtol=1e-12, atol=1e-12)
    assert not recon.requires_grad  # pixels carry no gradient in stage 1
    (terms["proxy_codes"] + terms["quantizer"]).backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in model.vqgan.parameters())
    trained = {id(p) for g in param_groups(model, 1e-4) for p in g["params"]}
    assert not trained & {id(p) for p in model.vqgan.parameters()}


# ---- stage 2 ----------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_stage2_step_changes_the_decoder_only(vqgan_file):
    model = two_stage("decoder-finetune", vqgan_file)
    x = images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, 1e-2), lr=1e-2)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.decoder.parameters()}
    recon, terms = model.training_losses(x)
    assert recon.shape == x.shape and terms == {}
    F.mse_loss(recon, x).backward()
    assert model.decoder.to_codes[-1].weight.grad.abs().sum() > 0  # through the frozen VQGAN decoder
    assert all(p.grad is None for p in model.vqgan.parameters())
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(("encoder.", "quantizer.", "vqgan.")):
            assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("decoder."))
    # decode() is the same soft path; forward() reconstructs with it
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model.training_losses(x)[0])


# ---- the two stages through the training loop -----------------------------------------------------
RUN = ["batch_size=4", "data.train_size=16", "data.val_size=4", "log_every=1", "sample_every=2",
       "optim.warmup_steps=1", "optim.lr=1e-3", "ckpt_every=10"]


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_stage1_then_stage2_through_train_tokenizer(tmp_path, vqgan_file):
    model = ["model.vqgan.hidden_channels=8", "model.vqgan.channel_mult=[1,1,2]", "model.vqgan.num_res_blocks=1",
             "model.vqgan.z_channels=8", "model.vqgan.num_codes=32", "model.vqgan.norm_groups=4",
             f"model.vqgan_weights={vqgan_file}"]
    s1 = load_train_config("titok-tiny", RUN + model + [
        "model.stage=proxy-codes", "max_steps=3", "loss.l2_weight=0", "loss.perceptual=none",
        "loss.adversarial.weight=0"])
    first = train_tokenizer(s1, tmp_path / "s1", progress=False)
    log1 = [json.loads(line) for line in (tmp_path / "s1/log.jsonl").read_text().splitlines()]
    assert len(log1) == 3 and all(e["proxy_codes"] > 0 and "metric/code_accuracy" in e for e in log1)
    assert (tmp_path / "s1/samples/step-0000002.png").is_file()
    stage1 = load_file(str(first / "model.safetensors"))
    assert train_tokenizer(s1, tmp_path / "s1", progress=False) == first  # the saved config resumes (tuples)

    s2 = load_train_config("titok-tiny", RUN + model + [
        "model.stage=decoder-finetune", "max_steps=2", f"init_from={first}", "loss.perceptual=none",
        "loss.adversarial.weight=0.1", "loss.adversarial.start_step=1"])
    final = train_tokenizer(s2, tmp_path / "s2", progress=False)
    log2 = [json.loads(line) for line in (tmp_path / "s2/log.jsonl").read_text().splitlines()]
    assert all(e["l2"] > 0 for e in log2) and "gan_g" in log2[-1] and "proxy_codes" not in log2[-1]
    stage2 = load_file(str(final / "model.safetensors"))
    assert stage1.keys() == stage2.keys()
    for k in stage1:
        if k.startswith(("encoder.", "quantizer.", "vqgan.")):
            assert torch.equal(stage1[k], stage2[k]), k
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith("decoder."))

    # the saved tokenizer carries its VQGAN: it loads and decodes without the weight file
    vqgan_file_moved = tmp_path / "elsewhere.safetensors"
    vqgan_file.rename(vqgan_file_moved)
    try:
        tok = load_tokenizer(final)
        assert tok.config.stage == "decoder-finetune" and not tok.vqgan.encoder.conv_in.weight.requires_grad
        with torch.no_grad():
            assert tok(images(2))[0].shape == (2, 3, 16, 16)
            assert tok.decode_codes(tok.encode_codes(images(2))).shape == (2, 3, 16, 16)
    finally:
        vqgan_file_moved.rename(vqgan_file)

    # a stage 2 pointed at another VQGAN than the one stage 1 learned is refused
    other = tmp_path / "other.safetensors"
    save_file(random_state(published_layout(**TINY_LAYOUT), seed=2), str(other))
    s2_other = dataclasses.replace(s2, model_overrides={**s2.model_overrides, "vqgan_weights": str(other)})
    with pytest.raises(CheckpointMismatchError, match="another MaskGIT-VQGAN than vqgan_weights="):
        train_tokenizer(s2_other, tmp_path / "s2-other", progress=False)
