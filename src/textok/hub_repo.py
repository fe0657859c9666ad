"""Model directories named the Hugging Face Hub's way: ``org/name`` read from the local Hub cache, and
``push_to_hub`` with a model card beside the weights.

Nothing is downloaded at run time: a name resolves only to a snapshot already in the local cache
(``huggingface-cli download org/name`` puts it there); a name that is not there is one error line saying so.
Uploading goes through ``huggingface_hub``'s file API (``create_repo`` + ``upload_folder``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import TextokError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
CARD_NAME = "README.md"


def is_repo_id(spec: str | os.PathLike[str]) -> bool:
    """``org/name`` that is not an existing local path."""
    text = str(spec)
    return bool(REPO_ID.match(text)) and not Path(text).exists()


def resolve_model_dir(spec: str | os.PathLike[str]) -> Path:
    """A local model directory: ``spec`` itself, or the cached snapshot of the Hub model ``org/name``."""
    if not is_repo_id(spec):
        return Path(spec)
    from huggingface_hub import snapshot_download  # lazy: only Hub names need it
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(spec), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        from huggingface_hub import constants

        raise TextokError(f"{spec} is neither a local model directory nor in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}); textok downloads nothing: fetch it first with "
                          f"`huggingface-cli download {spec}`") from None


def _rows(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def model_card(record: dict[str, Any], repo_id: str, training_data: str = "",
               metrics: dict[str, float] | None = None) -> str:
    """A Hub model card (README.md) for a saved textok model: what it is, how to load it, its config, what it
    was trained on or converted from, and its metrics."""
    model_type = record.get("model_type", "model")
    lines = ["---", "library_name: textok", "tags:", "- textok", f"- {model_type}"]
    if metrics:
        lines += ["model-index:", f"- name: {repo_id}", "  results:", "  - task:", "      type: image-tokenization",
                  "    metrics:"] + [f"    - name: {k}\n      type: {k}\n      value: {v}" for k, v in metrics.items()]
    lines += ["---", "", f"# {repo_id}", "", f"A textok `{model_type}` model (textok {record.get('textok_version', '?')}).",
              "", "```python", "from textok import load_tokenizer, load_generator",
              f"model = load_tokenizer(\"{repo_id}\")  # generators: load_generator(\"{repo_id}\")", "```", ""]
    source = record.get("converted_from")
    if source:
        lines += ["## Source", "", f"Converted with `textok convert --from {source.get('format')}` from the published "
                  f"`{source.get('file')}` ({source.get('variant')}, sha256 `{source.get('sha256')}`).", ""]
    lines += ["## Training data", "", training_data or "Not recorded.", "", "## Metrics", ""]
    lines += ([f"| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()] if metrics
              else ["Not recorded."])
    lines += ["", "## Config", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in _rows(record.get("config", {}))]
    return "\n".join(lines) + "\n"


def push_folder(directory: str | Path, repo_id: str, *, training_data: str = "",
                metrics: dict[str, float] | None = None, private: bool = False, token: str | None = None,
                commit_message: str = "Upload a textok model") -> str:
    """Upload a saved model directory to the Hub repository ``repo_id`` (created if needed), with a model card
    (README.md) written beside the weights in a copy of it. Returns the commit's URL."""
    if not REPO_ID.match(repo_id):
        raise TextokError(f"{repo_id!r} is not a Hub repository name: use org/name")
    source = Path(directory)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise TextokError(f"{source} is not a saved textok model (config.json is missing); save it first")
    from huggingface_hub import HfApi  # lazy: only uploads need it

    with tempfile.TemporaryDirectory(prefix="textok-push-") as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(source, folder)
        record = json.loads(config_path.read_text())
        (folder / CARD_NAME).write_text(model_card(record, repo_id, training_data, metrics))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 repo_type="model")
    return str(getattr(info, "commit_url", info))


__all__ = ["CARD_NAME", "is_repo_id", "model_card", "push_folder", "resolve_model_dir"]
