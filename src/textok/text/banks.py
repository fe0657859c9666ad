"""Per-class caption banks.

For class-conditional generation TexTok decodes a generated token sequence with a caption drawn from the
class's bank; the paper excludes the captions of the training images when they are known. A bank is a plain
``{class_id: [captions]}`` mapping, saved as JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import TextokError
from ..io import atomic_write_text, read_json


class CaptionBank:
    def __init__(self, captions: dict[int, list[str]], class_names: list[str] | None = None) -> None:
        self.captions = {int(k): list(v) for k, v in captions.items()}
        self.class_names = class_names or [str(k) for k in sorted(self.captions)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sample(self, label: int, rng: random.Random, exclude: set[str] | frozenset[str] = frozenset()) -> str:
        if not self.captions.get(label):
            with_captions = sorted(k for k, v in self.captions.items() if v)
            raise TextokError(f"class {label} has no captions in the bank (classes with captions: {with_captions}): "
                              "choose one of those, or extract the latents from more images so that every class has some")
        pool = [c for c in self.captions[label] if c not in exclude] or self.captions[label]
        return rng.choice(pool)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"class_names": self.class_names,
                                            "captions": {str(k): v for k, v in self.captions.items()}}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CaptionBank":
        path = Path(path)
        if not path.is_file():
            raise TextokError(f"caption bank {path} does not exist")
        data = read_json(path, f"caption bank {path}")
        try:
            return cls({int(k): list(v) for k, v in data["captions"].items()}, data.get("class_names"))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TextokError(f"caption bank {path} is corrupt (not a {{\"captions\": {{class: [...]}}}} "
                              "record)") from None
