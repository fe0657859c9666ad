"""Export the embedded captioned scenes to an image folder with captions of a chosen level of detail.

Why: the scenes' own captions state every colour, shape, size and position, and a small tokenizer leans on them
hard (another scene's caption costs ~4 dB); Flickr8k's do not, and the tokenizer ignores them. Training the same
study on the same images with less informative captions tests whether caption detail is what makes text pay:

* ``full``: the scenes' own five captions;
* ``background``: only the background ("horizontal purple and cyan stripes"), what the 4 tokens mostly hold;
* ``objects``: only the objects' colours and shapes, no positions, sizes or background;
* ``class``: only the class, the main shape ("a drawing with a triangle"), like a class-conditional caption.

    python benchmarks/export_scenes.py --out runs/scenes-objects --captions objects
    textok study --data runs/scenes-objects --recipe study-scenes --tokens 4 --modes decoder none --out runs/s-obj
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textok.data.images import save_image  # noqa: E402
from textok.data.scenes import SHAPES, CaptionedScenes, Scene, _background_phrase, captions_for  # noqa: E402

DETAIL = ("full", "background", "objects", "class")


def captions(scene: Scene, detail: str) -> list[str]:
    if detail == "full":
        return captions_for(scene)
    if detail == "background":
        bg = _background_phrase(scene)
        return [bg[0].upper() + bg[1:] + "."]
    if detail == "objects":
        parts = [f"{o.color} {o.shape}" for o in scene.objects]
        return ["Shapes: " + ", ".join(parts) + "."]
    return [f"A drawing with a {SHAPES[scene.label]}."]


def export(out: Path, detail: str, train: int, val: int, size: int, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("train", train), ("val", val)):
        data = CaptionedScenes(size, split=split, size=count, seed=seed)
        (out / split).mkdir(exist_ok=True)
        for i in range(len(data)):
            name = f"{split}/{i:05d}.png"
            save_image(data[i]["image"].unsqueeze(0), str(out / name), nrow=1)
            rows.append({"file": name, "captions": captions(data.scene(i), detail)})
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--captions", choices=DETAIL, default="full")
    p.add_argument("--train", type=int, default=2000, help="training scenes (the study-scenes recipe's 2,000)")
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the scenes' generator seed (data.seed)")
    args = p.parse_args(argv)
    out = export(Path(args.out), args.captions, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} + {args.val} scenes with {args.captions!r} captions to {out}")


if __name__ == "__main__":
    main()
