"""Models named the Hub's way: ``org/name`` from a local Hub cache the test builds, and ``push_to_hub`` with the
upload calls replaced (nothing is fetched or sent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from textok import TiTok, TiTokConfig, load_tokenizer
from textok.cli import main
from textok.errors import TextokError
from textok.hub_repo import is_repo_id, model_card, push_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hub cache holding ``textok-test/titok-tiny`` as `huggingface-cli download` lays it out."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--textok-test--titok-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    torch.manual_seed(0)
    TiTok(TiTokConfig.preset("titok-tiny")).save_pretrained(repo / "snapshots" / COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return repo / "snapshots" / COMMIT


def test_a_hub_name_loads_from_the_local_cache(hub_cache, tmp_path, capsys):
    model = load_tokenizer("textok-test/titok-tiny")
    same = TiTok.from_pretrained(hub_cache)
    for (k, a), b in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), k
    assert isinstance(TiTok.from_pretrained("textok-test/titok-tiny"), TiTok)
    assert main(["info", str(hub_cache)]) == 0


def test_a_name_not_in_the_cache_says_so(hub_cache, capsys):
    with pytest.raises(TextokError, match=r"textok-test/absent is neither a local model directory nor in the local "
                                          r"Hugging Face cache .*huggingface-cli download textok-test/absent"):
        load_tokenizer("textok-test/absent")
    from PIL import Image

    Image.new("RGB", (16, 16)).save("x.png")
    code = main(["reconstruct", "--model", "textok-test/absent", "--image", "x.png", "--out", "r.png"])
    err = capsys.readouterr().err
    assert code == 2 and "nor in the local Hugging Face cache" in err and len(err.strip().splitlines()) == 1


def test_local_paths_are_not_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_id("org/name") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")
    Path("org/name").mkdir(parents=True)
    assert not is_repo_id("org/name")  # an existing folder wins


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list = []

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeApi.calls.append(("upload_folder", repo_id, files))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_to_hub_uploads_weights_config_and_a_model_card(fake_hub):
    torch.manual_seed(0)
    model = TiTok(TiTokConfig.preset("titok-tiny"))
    url = model.push_to_hub("me/titok-tiny", training_data="Flowers-102, 64 px", metrics={"psnr": 21.5},
                            private=True)
    assert url.endswith("/me/titok-tiny/commit/abc")
    (create, repo, kw), (upload, repo2, files) = fake_hub
    assert create == "create_repo" and kw["private"] is True and kw["exist_ok"] is True
    assert upload == "upload_folder" and repo == repo2 == "me/titok-tiny"
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "library_name: textok" in card and "Flowers-102, 64 px" in card and "| psnr | 21.5 |" in card
    assert "`num_tokens` | `4`" in card and 'load_tokenizer("me/titok-tiny")' in card
    assert json.loads(files["config.json"])["model_type"] == "titok"


def test_push_folder_keeps_the_saved_records_and_refuses_bad_names(fake_hub, tmp_path):
    d = TiTok(TiTokConfig.preset("titok-tiny")).save_pretrained(tmp_path / "m", extra={"converted_from": {
        "format": "titok", "file": "tokenizer_titok_l32.bin", "variant": "titok-l-32", "sha256": "ab" * 32}})
    push_folder(d, "me/converted")
    card = fake_hub[1][2]["README.md"].decode()
    assert "textok convert --from titok" in card and "tokenizer_titok_l32.bin" in card
    assert not (tmp_path / "m" / "README.md").exists()  # the user's folder is left as it was
    with pytest.raises(TextokError, match="not a Hub repository name"):
        push_folder(d, "no-slash")
    with pytest.raises(TextokError, match="not a saved textok model"):
        push_folder(tmp_path, "me/x")


def test_model_card_without_metrics_says_not_recorded():
    card = model_card({"model_type": "maskgit", "config": {"num_tokens": 32}}, "me/g")
    assert card.count("Not recorded.") == 2 and "model-index" not in card
