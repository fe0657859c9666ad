"""`textok eval generation` computes the reference statistics once: the second call reads them (the feature
network never sees a reference image) and gives the same number; changed reference data, another feature size or
``--ref-num`` give another key and are computed again; ``--ref-stats FILE`` reads and writes one named file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import textok.eval.generation as generation
from textok.cli import main
from textok.data import CaptionedScenes, collate
from textok.eval import ref_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def scenes_uint8(n: int, split: str = "val", size: int = 16) -> np.ndarray:
    data = CaptionedScenes(size, split, size=n)
    x = collate([data[i] for i in range(n)])["image"]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@pytest.fixture
def counted(monkeypatch, tmp_path: Path) -> dict[str, int]:
    """A private cache directory, and how many batches of reference images went through the feature network."""
    monkeypatch.setenv("TEXTOK_CACHE", str(tmp_path / "cache"))
    calls = {"reference": 0}
    stream = generation._Features.stream

    def counting(self, batches, keep_logits=False, progress=False, desc="features", total=None):
        if desc == "reference":
            batches = list(batches)
            calls["reference"] += len(batches)
        return stream(self, batches, keep_logits, progress, desc, total)

    monkeypatch.setattr(generation._Features, "stream", counting)
    return calls


def run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    rc = main(["eval", "generation", "--samples", str(tmp_path / "s.npz"), "--fd-size", "32", "--batch-size", "4",
               "--quiet", "--out", str(out), *args])
    assert rc == 0
    return json.loads(out.read_text())


def test_second_call_reads_the_cached_scenes_statistics(tmp_path: Path, counted: dict[str, int]) -> None:
    np.savez(tmp_path / "s.npz", scenes_uint8(6, "train"))
    first = run(tmp_path, "a", "--ref", "scenes", "--ref-num", "10")
    assert counted["reference"] == 3 and first["ref_stats"].startswith("computed")
    files = list((tmp_path / "cache" / "ref-stats").glob("*.npz"))
    assert len(files) == 1
    second = run(tmp_path, "b", "--ref", "scenes", "--ref-num", "10")
    assert counted["reference"] == 3 and second["ref_stats"] == f"read from {files[0]}"
    assert second["FD-opennsfw@32"] == first["FD-opennsfw@32"] and second["num_reference"] == 10
    run(tmp_path, "c", "--ref", "scenes", "--ref-num", "8")  # another number of images: another key
    run(tmp_path, "d", "--ref", "scenes", "--ref-num", "10", "--fd-size", "48")  # another feature network input
    assert counted["reference"] == 3 + 2 + 3
    assert len(list((tmp_path / "cache" / "ref-stats").glob("*.npz"))) == 3
    run(tmp_path, "e", "--ref", "scenes", "--ref-num", "10", "--no-ref-cache")
    assert counted["reference"] == 11


def test_a_changed_reference_folder_is_computed_again(tmp_path: Path, counted: dict[str, int]) -> None:
    np.savez(tmp_path / "s.npz", scenes_uint8(6, "train"))
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(scenes_uint8(8)):
        Image.fromarray(img).save(ref / f"{i}.png")
    first = run(tmp_path, "a", "--ref", str(ref))
    assert counted["reference"] == 2 and first["ref_stats"].startswith("computed")
    assert run(tmp_path, "b", "--ref", str(ref))["FD-opennsfw@32"] == first["FD-opennsfw@32"]
    assert counted["reference"] == 2
    Image.fromarray(255 - scenes_uint8(1)[0]).save(ref / "0.png")  # new content (and size or time)
    os.utime(ref / "0.png", ns=(1, 1))
    changed = run(tmp_path, "c", "--ref", str(ref))
    assert counted["reference"] == 4 and changed["ref_stats"].startswith("computed")
    assert changed["FD-opennsfw@32"] != first["FD-opennsfw@32"]


def test_explicit_ref_stats_file(tmp_path: Path, counted: dict[str, int], capsys) -> None:
    np.savez(tmp_path / "s.npz", scenes_uint8(6, "train"))
    stats = tmp_path / "ref-stats.npz"
    first = run(tmp_path, "a", "--ref", "scenes", "--ref-num", "10", "--ref-stats", str(stats))
    assert stats.is_file() and not (tmp_path / "cache").exists() and counted["reference"] == 3
    second = run(tmp_path, "b", "--ref", "scenes", "--ref-num", "10", "--ref-stats", str(stats))
    assert counted["reference"] == 3 and second["FD-opennsfw@32"] == first["FD-opennsfw@32"]
    # the file is also a statistics file for --ref, and gives the same number
    assert run(tmp_path, "c", "--ref", str(stats))["FD-opennsfw@32"] == pytest.approx(first["FD-opennsfw@32"],
                                                                                      rel=1e-9)
    # other settings: recomputed and replaced, with one line saying so
    run(tmp_path, "d", "--ref", "scenes", "--ref-num", "8", "--ref-stats", str(stats))
    assert counted["reference"] == 5 and "other reference data" in capsys.readouterr().out
    assert ref_cache.stored_identity(stats)["ref_num"] == 8
    # statistics from elsewhere (no identity) are never overwritten
    np.savez(tmp_path / "theirs.npz", mu=np.zeros(1024), sigma=np.eye(1024))
    rc = main(["eval", "generation", "--samples", str(tmp_path / "s.npz"), "--ref", "scenes", "--fd-size", "32",
               "--quiet", "--ref-stats", str(tmp_path / "theirs.npz")])
    assert rc == 2 and "--ref-stats did not write" in capsys.readouterr().err
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "theirs.npz")["sigma"]), torch.eye(1024, dtype=torch.float64))


def test_computing_the_reference_prints_its_estimated_time(tmp_path: Path, counted: dict[str, int], capsys) -> None:
    np.savez(tmp_path / "s.npz", scenes_uint8(6, "train"))
    rc = main(["eval", "generation", "--samples", str(tmp_path / "s.npz"), "--fd-size", "32", "--batch-size", "1",
               "--quiet", "--ref", "scenes", "--ref-num", "56"])
    assert rc == 0 and counted["reference"] == 56
    lines = [line for line in capsys.readouterr().out.splitlines() if "about" in line]
    assert len(lines) == 1 and lines[0].startswith("eval generation, reference: about") and "of 56" in lines[0]
