"""TiTok's two-stage recipe: the MaskGIT-VQGAN (published key layout, numerics on a tiny random one)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from textok.errors import TextokError
from textok.models.maskgit_vqgan import MaskGITVQGAN, MaskGITVQGANConfig, ResBlock

TINY_VQGAN = MaskGITVQGANConfig.preset("maskgit-vqgan-tiny")  # 16 px -> 4 x 4 codes of 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ---- the VQGAN ------------------------------------------------------------------------------------
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


def test_resblock_projects_its_output_when_the_width_changes():
    """The published weights were trained with the residual taken from the block's output (JAX MaskGIT)."""
    torch.manual_seed(0)
    blk = ResBlock(8, 16, groups=4).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    h = blk.conv2(F.silu(blk.norm2(blk.conv1(F.silu(blk.norm1(x))))))
    torch.testing.assert_close(blk(x), h + blk.nin_shortcut(h), rtol=1e-12, atol=1e-12)
