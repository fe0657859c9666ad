"""Shared fixtures: tiny configs, random text embeddings, a tiny random T5 on disk."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TEXTOK_CACHE"] = tempfile.mkdtemp(prefix="textok-tests-cache-")  # tests never write the user's cache
atexit.register(shutil.rmtree, os.environ["TEXTOK_CACHE"], ignore_errors=True)  # ... and leave none behind
os.environ["TEXTOK_THREADS"] = "1"  # what `textok` run in-process sets torch to: one thread, as below
torch.set_num_threads(1)

REAL_DATA = Path(os.environ["TEXTOK_DATA"]) if os.environ.get("TEXTOK_DATA") else None  # real data sets, if any


def real_data(name: str) -> Path | None:
    """``$TEXTOK_DATA/name`` when that exists (tests on real data skip without it)."""
    return REAL_DATA / name if REAL_DATA is not None and (REAL_DATA / name).exists() else None


def random_text(batch: int, length: int = 6, dim: int = 384, lengths: list[int] | None = None, seed: int = 0):
    from textok.text.embeddings import TextEmbeddings

    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, dim, generator=g)
    lengths = lengths or [length] * batch
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return TextEmbeddings(states, mask)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (restored after it): tiny models run fastest on one thread, and the CPU is
    shared (two threads under load are ~10x slower). Use with ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg():
    from textok import TexTokConfig

    return TexTokConfig.preset("textok-tiny")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer T5 encoder with a word-level tokenizer, saved like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    d = tmp_path_factory.mktemp("tiny_t5")
    words = "<pad> </s> <unk> a an the red blue green circle square on background of with and in at top left".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=16)
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(cfg).save_pretrained(d)
    return d


def pytest_configure(config) -> None:
    # Registered here rather than in pyproject.toml, whose changes rebuild the venv.
    config.addinivalue_line("markers", "numerics: tests whose numbers depend on the CPU's kernels; `make test` runs "
                                       "them a second time with ATEN_CPU_CAPABILITY=default")
