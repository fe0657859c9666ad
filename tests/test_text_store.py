"""The memory-mapped text-state store: written once, read by any run of the same encoder, refused by another."""

import json
import zlib

import numpy as np
import pytest
import torch

from textok.cli import main
from textok.errors import TextokError
from textok.text.embeddings import TextEmbeddings
from textok.text.store import StoreTextCache, TextStateStore, default_store_dir


class FakeEncoder:
    """Per-token states that depend on the caption only; one token per word + 1."""

    name, dim = "fake", 6

    def __init__(self):
        self.calls = 0

    def encode(self, captions):
        self.calls += len(captions)
        length = max(len(c.split()) + 1 for c in captions)
        states = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, c in enumerate(captions):
            n = len(c.split()) + 1
            g = torch.Generator().manual_seed(zlib.crc32(c.encode()))
            states[i, :n] = torch.randn(n, self.dim, generator=g) * 3
            mask[i, :n] = True
        return TextEmbeddings(states, mask)


CAPTIONS = [(f"caption number {i} " + "word " * (i % 4)).strip() for i in range(30)]


def test_store_round_trip_second_run_encodes_nothing_and_rows_are_memory_mapped(tmp_path):
    enc = FakeEncoder()
    store = TextStateStore(tmp_path / "s", encoder="fake", max_length=16, dim=6)
    assert store.fill(CAPTIONS[:20], enc.encode, batch_size=7) == 20
    assert store.fill(CAPTIONS, enc.encode, batch_size=7, segment_captions=4) == 10  # 3 more segments
    assert enc.calls == 30 and len(store) == 30
    again = TextStateStore(tmp_path / "s", encoder="fake", max_length=16)  # another run
    assert again.fill(CAPTIONS, enc.encode) == 0 and enc.calls == 30
    assert all(isinstance(s.states, np.memmap) for s in again._segments.values()) and len(again._segments) == 4
    ref = enc.encode(CAPTIONS[::-1])
    got = again.lookup(CAPTIONS[::-1])
    assert torch.equal(got.mask, ref.mask)
    assert torch.equal(got.states, ref.states.half().float() * ref.mask[..., None])
    with pytest.raises(TextokError, match="1 captions are not in the text-state store.*encode-captions"):
        again.lookup(["never stored"])
    # a store the run does not fully cover: the rest is encoded on the fly, counted, not written
    cache = StoreTextCache(again, FakeEncoder)
    mixed = cache.encode([CAPTIONS[0], "a new one", CAPTIONS[3]])
    assert cache.hits == 2 and cache.misses == 1 and len(again) == 30
    assert torch.equal(mixed.states[1, :4], FakeEncoder().encode(["a new one"]).states[0].half().float())


def test_another_encoder_or_length_is_refused_naming_both(tmp_path):
    TextStateStore(tmp_path / "s", encoder="t5:/models/t5-xl", max_length=64, dim=6)
    with pytest.raises(TextokError, match="built with encoder 't5:/models/t5-xl', not 'minilm'"):
        TextStateStore(tmp_path / "s", encoder="minilm", max_length=64)
    with pytest.raises(TextokError, match="max_length=64 .* needs max_length=32"):
        TextStateStore(tmp_path / "s", encoder="t5:/models/t5-xl", max_length=32)
    with pytest.raises(TextokError, match="write one with `textok encode-captions`"):
        TextStateStore(tmp_path / "none", encoder="minilm", max_length=64)


def test_pooled_only_and_bfloat16(tmp_path):
    enc = FakeEncoder()
    store = TextStateStore(tmp_path / "p", encoder="fake", max_length=16, pooled=True, dim=6, dtype="bfloat16")
    store.fill(CAPTIONS, enc.encode)
    got = TextStateStore(tmp_path / "p", encoder="fake", max_length=16, pooled=True).lookup(CAPTIONS[:5])
    ref = enc.encode(CAPTIONS[:5]).pooled()
    assert got.states.shape == (5, 1, 6) and got.mask.all()
    assert torch.equal(got.states, ref.states.bfloat16().float())
    assert (tmp_path / "p" / next(p.name for p in (tmp_path / "p").glob("*.states"))).stat().st_size == 30 * 6 * 2


def test_encode_captions_cli_fills_the_user_store_once_and_training_on_shards_reads_it(tmp_path, monkeypatch, capsys):
    from test_shards import _image_folder
    from textok.text.encoders import HFTextEncoder
    from textok.train.config import load_train_config
    from textok.train.tokenizer import train_tokenizer

    monkeypatch.setenv("TEXTOK_CACHE", str(tmp_path / "cache"))
    _image_folder(tmp_path / "src", n=12, splits=("train", "val"))
    assert main(["make-shards", str(tmp_path / "src"), "--out", str(tmp_path / "sh"), "--shard-size", "3",
                 "--no-progress"]) == 0
    assert main(["encode-captions", str(tmp_path / "sh"), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "36" in out and str(default_store_dir("minilm", 64)) in out  # 24 images x 2 captions, 36 distinct
    assert main(["encode-captions", str(tmp_path / "sh"), "--no-progress", "--device", "cpu"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:3] == ["36", "36", "0"]  # captions, already stored, encoded now
    meta = json.loads((default_store_dir("minilm", 64) / "store.json").read_text())
    assert meta["encoder"] == "minilm" and meta["dim"] == 384

    calls = {"n": 0}
    real = HFTextEncoder.encode

    def counting(self, captions):
        calls["n"] += len(captions)
        return real(self, captions)

    monkeypatch.setattr(HFTextEncoder, "encode", counting)
    cfg = load_train_config("textok-tiny", [f"data.source={tmp_path / 'sh'}", "batch_size=4", "max_steps=2",
                                            "sample_every=0", "loss.perceptual=none", "data.shuffle_buffer=4",
                                            "data.train_size=0"])  # stream the shards (not the demo recipe's 2,000)
    train_tokenizer(cfg, tmp_path / "run", progress=False)
    assert calls["n"] == 0 and not (tmp_path / "run/text_cache.safetensors").exists()
    # a store named by path that another encoder built is refused
    other = tmp_path / "other"
    TextStateStore(other, encoder="t5:/elsewhere", max_length=64, dim=8)
    with pytest.raises(TextokError, match="built with encoder 't5:/elsewhere', not 'minilm'"):
        train_tokenizer(cfg.override([f"text_store={other}"]), tmp_path / "run2", progress=False)


def test_fill_batches_captions_of_similar_length():
    """The encoder pads each batch to its longest caption; fill encodes shortest first, so the padded work is the
    least any batching of these captions can have (in alphabetical order, as before, 1.4x here), and the stored rows
    are the same."""
    # a..x first, so neither input nor alphabetical order groups the lengths (2..13 words, mixed)
    captions = [f"{chr(97 + i)} " + ("word " * (1 + (7 * i) % 12)).strip() for i in range(24)]
    batches: list[list[str]] = []

    class Recording(FakeEncoder):
        def encode(self, chunk):
            batches.append(list(chunk))
            return super().encode(chunk)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        store = TextStateStore(Path(tmp) / "s", encoder="fake", max_length=16, dim=6)
        assert store.fill(captions, Recording().encode, batch_size=6) == 24
        padded = sum(len(b) * max(len(c.split()) + 1 for c in b) for b in batches)
        in_order = sum(len(captions[i:i + 6]) * max(len(c.split()) + 1 for c in captions[i:i + 6])
                       for i in range(0, 24, 6))
        best = sum(6 * max(len(c.split()) + 1 for c in sorted(captions, key=lambda c: len(c.split()))[i:i + 6])
                   for i in range(0, 24, 6))
        assert padded == best < in_order
        got = store.lookup(captions)
        ref = FakeEncoder().encode(captions)
        assert torch.equal(got.mask, ref.mask)
        assert torch.equal(got.states, ref.states.half().float() * ref.mask[..., None])
