"""The one reader of external weight files: the format told from the bytes, weights_only, one-line refusals."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from textok.errors import TextokError
from textok.weights import read_state_dict, weights_format


class _NotWeights:
    """A class a pickle can name but ``weights_only`` must refuse to build."""


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_format_reads_the_same_tensors_whatever_the_name(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "weights.pth"))  # safetensors under a .pth name
    torch.save(state, tmp_path / "zip.safetensors")  # a torch zip under a .safetensors name
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"teacher": state, "student": {"x": torch.zeros(1)}}, tmp_path / "dino.pth")
    expected = {"weights.pth": "safetensors", "zip.safetensors": "torch", "legacy.bin": "torch",
                "wrapped.pth": "torch", "dino.pth": "torch"}
    for name, fmt in expected.items():
        assert weights_format(tmp_path / name) == fmt, name
        assert _same(read_state_dict(tmp_path / name, "test weights", "a state dict"), state), name


def test_refusals_are_one_line_naming_the_file_and_the_fix(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    torch.save({"net": _NotWeights()}, tmp_path / "code.pth")  # would run code under a plain pickle load
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    torch.save({"w": [1.0, 2.0]}, tmp_path / "lists.pth")
    cases = {"junk.bin": "cannot read VGG16 weights from .*junk.bin \\(neither a safetensors file nor a torch.save",
             "code.pth": "cannot read VGG16 weights from .*code.pth \\(.*\\); give torchvision's file",
             "plain.pkl": "cannot read VGG16 weights from .*plain.pkl \\(.*\\); give torchvision's file",
             "lists.pth": "lists.pth does not hold a flat state dict of tensors",
             "absent.pth": "VGG16 weights not found at .*absent.pth: torchvision's file"}
    for name, message in cases.items():
        with pytest.raises(TextokError, match=message) as err:
            read_state_dict(tmp_path / name, "VGG16 weights", "torchvision's file")
        assert "\n" not in str(err.value), name
