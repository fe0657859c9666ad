"""A tiny captioned, labelled image tar in the Flowers-102 layout, made from the embedded scenes.

Why: the GPU suite's CPU smoke mode and its tests must run the real data path (a tar of JPEGs with a
``captions.jsonl`` of ``{file, split, captions, label}``) on a machine without the real data sets (``$TEXTOK_DATA``).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textok.data.scenes import CaptionedScenes, captions_for  # noqa: E402


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_tiny_captioned_tar(path: Path, images: int = 24, size: int = 64, held_out: int = 8) -> Path:
    """``images`` training scenes and ``held_out`` dev scenes as JPEGs, five captions and a label each."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(path, "w") as tar:
        for split, count in (("train", images), ("dev", held_out)):
            scenes = CaptionedScenes(size, split="train" if split == "train" else "val", size=count, seed=0)
            for i in range(count):
                pixels = ((scenes[i]["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                name = f"{split}/image_{i:05d}.jpg"
                _add(tar, name, buf.getvalue())
                scene = scenes.scene(i)
                rows.append({"file": name, "split": split, "captions": captions_for(scene), "label": scene.label})
        _add(tar, "captions.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path
