import pytest
import torch

from numerics import assert_same_maths

from textok import TexTok
from textok.errors import TextokError
from textok.text import TextEmbeddingCache, load_text_encoder
from textok.text.banks import CaptionBank


def test_default_encoder_is_offline_minilm():
    enc = load_text_encoder("minilm")
    emb = enc.encode(["a red circle on a blue background", "a square"])
    assert emb.states.shape[0] == 2 and emb.dim == 384
    assert emb.mask[0].sum() > emb.mask[1].sum()  # longer caption, more real tokens
    assert torch.isfinite(emb.states).all()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_tiny_t5_from_local_dir(tiny_t5_dir):
    enc = load_text_encoder(f"t5:{tiny_t5_dir}")
    emb = enc.encode(["a red circle", "the blue square on green background"])
    assert emb.dim == 32 and emb.states.shape[0] == 2
    assert emb.mask[0].sum() == 3 and emb.mask[1].sum() == 6
    # per-token states of a real T5 forward: equal to calling the model directly
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(str(tiny_t5_dir)).eval()
    ids = enc.tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids).last_hidden_state[0]
    assert_same_maths(emb.states[0, :3], ref, what="batch of 2 (padded) vs 1")


def test_textok_with_t5_strings(tiny_t5_dir, tiny_cfg):
    model = TexTok(tiny_cfg.override({"text_encoder": f"t5:{tiny_t5_dir}", "text_dim": 32}))
    z = model.encode(torch.zeros(2, 3, 16, 16), ["a red circle", "a blue square"])
    assert z.shape == (2, 4, 4)


def test_missing_encoder_dir_and_bad_spec(tmp_path):
    with pytest.raises(TextokError, match="does not exist"):
        load_text_encoder(f"t5:{tmp_path / 'nope'}")
    with pytest.raises(TextokError, match="unknown text encoder"):
        load_text_encoder("clip-big")


def test_empty_and_long_captions(tiny_t5_dir):
    enc = load_text_encoder(f"t5:{tiny_t5_dir}")
    with pytest.raises(TextokError, match="caption 1 is empty"):
        enc.encode(["a circle", "  "])
    with pytest.warns(UserWarning, match="truncated"):
        emb = enc.encode([" ".join(["red"] * 40)])
    assert emb.states.shape[1] == 16


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_cache_hits_and_matches_encoder(tmp_path):
    enc = load_text_encoder("minilm")
    cache = TextEmbeddingCache(enc)
    caps = ["a red circle", "a large blue square at the top left"]
    first = cache.encode(caps)
    assert cache.misses == 2 and cache.hits == 0
    again = cache.encode(caps[::-1])
    assert cache.misses == 2 and cache.hits == 2
    direct = enc.encode(caps)
    assert torch.equal(first.mask, direct.mask)
    real = direct.mask  # padded positions differ (zeros vs the encoder's outputs) and are never attended to
    assert_same_maths(first.states[real], direct.states[real], dtype=torch.float16, what="cached")  # stored in fp16
    assert torch.equal(again.mask, direct.mask.flip(0))
    cache.save(tmp_path / "c.safetensors")
    fresh = TextEmbeddingCache(enc)
    assert fresh.load(tmp_path / "c.safetensors") == 2
    fresh.encode(caps)
    assert fresh.misses == 0 and fresh.hits == 2


def test_caption_bank_excludes_and_round_trips(tmp_path):
    import random

    bank = CaptionBank({0: ["a", "b"], 1: ["c"]}, ["x", "y"])
    rng = random.Random(0)
    assert {bank.sample(0, rng, exclude={"a"}) for _ in range(20)} == {"b"}
    bank.save(tmp_path / "bank.json")
    assert CaptionBank.load(tmp_path / "bank.json").captions == bank.captions
    with pytest.raises(TextokError, match="class 5"):
        bank.sample(5, rng)


def test_caption_bank_class_without_captions_is_one_line() -> None:
    import random

    from textok.errors import TextokError
    from textok.text.banks import CaptionBank

    bank = CaptionBank({0: ["a red circle"], 1: []})
    assert bank.sample(0, random.Random(0)) == "a red circle"
    with pytest.raises(TextokError, match=r"class 1 has no captions.*\[0\]"):
        bank.sample(1, random.Random(0))
