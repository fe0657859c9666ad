"""The paper's pipeline as a user runs it, through the real command line, at toy size on the CPU.

An ImageNet-layout folder with no captions -> `caption` (a tiny random BLIP) -> `make-shards` -> `encode-captions`
(a tiny random T5) -> `train-tokenizer` under 2 gloo processes -> `extract-latents` -> `train-generator` (DiT, 2
processes) -> `sample --npz` (2 processes) -> `eval generation`. Each step reads only what the one before it
wrote. The numbers are meaningless; that the chain connects is the point.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from textok.cli import main
from vlm_models import image_folder, make_blip

CLASSES = {"n01440764": 6, "n01443537": 6, "n01484850": 6}  # three ImageNet synsets as class folders
NAMES = "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n"


def _worker(rank: int, world: int, port: int, argv: list[str], log: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with open(f"{log}.rank{rank}", "w") as out, contextlib.redirect_stdout(out):
        assert main(argv) == 0, argv


def torchrun(argv: list, log: Path) -> str:
    """``torchrun --nproc_per_node 2 -m textok.cli ARGV`` on the CPU: two spawned processes joined by gloo;
    returns what rank 0 printed."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, [str(a) for a in argv], str(log)), nprocs=2, start_method="spawn")
    return Path(f"{log}.rank0").read_text()


def run(argv: list, capsys) -> str:
    assert main([str(a) for a in argv]) == 0, argv
    return capsys.readouterr().out


@pytest.mark.slow
def test_uncaptioned_imagenet_folder_to_samples_and_their_score(tmp_path, tiny_t5_dir, capsys):
    data = image_folder(tmp_path / "imagenet", CLASSES, size=40, split="train")
    image_folder(data, {k: 2 for k in CLASSES}, size=40, split="val", seed=1)
    (data / "LOC_synset_mapping.txt").write_text(NAMES)
    blip = make_blip(tmp_path / "blip")

    out = run(["caption", data, "--vlm", blip, "--prompt", "a photo of a {class_name}", "--captions-per-image", "2",
               "--max-new-tokens", "8", "--batch-size", "8", "--no-progress", "--device", "cpu"], capsys)
    assert "24 " in out.splitlines()[2]  # 24 images captioned
    rows = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} == set(CLASSES) and all(len(r["captions"]) == 2 for r in rows)

    run(["make-shards", data, "--out", tmp_path / "shards", "--image-size", "16", "--shard-size", "4",
         "--no-progress"], capsys)
    index = json.loads((tmp_path / "shards/index.json").read_text())
    assert index["class_names"] == sorted(CLASSES) and sum(e["count"] for e in index["splits"]["train"]) == 18
    text = [f"model.text_encoder=t5:{tiny_t5_dir}", "model.text_max_length=16", "model.text_dim=32"]
    run(["encode-captions", tmp_path / "shards", "--encoder", f"t5:{tiny_t5_dir}", "--max-length", "16", "--store",
         tmp_path / "store", "--no-progress", "--device", "cpu"], capsys)

    torchrun(["train-tokenizer", "--config", "textok-tiny", "--out", tmp_path / "tok", "--max-steps", "2",
              "--no-progress", f"data.source={tmp_path / 'shards'}", "data.train_size=0", "data.val_split=val",
              "data.shuffle_buffer=4", "batch_size=2", "log_every=1", "sample_every=0", "loss.perceptual=none",
              "loss.adversarial.weight=0", "device=cpu", *text, f"text_store={tmp_path / 'store'}"],
             tmp_path / "tok.log")
    assert (tmp_path / "tok/final/model.safetensors").is_file()

    out = run(["extract-latents", "--tokenizer", tmp_path / "tok/final", "--data", tmp_path / "shards",
               "--out", tmp_path / "lat", "--batch-size", "8", "--device", "cpu", "--no-progress"], capsys)
    assert "18 x (4, 4)" in out and "3 classes" in out
    bank = json.loads((tmp_path / "lat/caption_bank.json").read_text())
    vlm_captions = {c for r in rows if r["file"].startswith("train/") for c in r["captions"]}
    assert {c for caps in bank["captions"].values() for c in caps} == vlm_captions  # the bank: the VLM's captions

    torchrun(["train-generator", "--latents", tmp_path / "lat", "--out", tmp_path / "gen", "--config", "dit-tiny",
              "--max-steps", "2", "--no-progress", "model.width=32", "model.depth=1", "model.heads=2",
              "batch_size=4", "log_every=1", "diffusion=flow", "device=cpu"], tmp_path / "gen.log")
    out = torchrun(["sample", "--generator", tmp_path / "gen/final", "--npz", tmp_path / "samples.npz", "--num", "6",
                    "--steps", "2", "--batch-size", "2", "--no-progress", "--device", "cpu"], tmp_path / "sample.log")
    assert f"caption bank {tmp_path / 'gen/final/caption_bank.json'} (36 captions of the train split of " in out
    assert not Path(f"{tmp_path / 'sample.log'}.rank1").read_text()  # one process reports
    samples = np.load(tmp_path / "samples.npz")
    assert samples["arr_0"].shape == (6, 16, 16, 3) and sorted(set(samples["arr_1"].tolist())) == [0, 1, 2]

    out = run(["eval", "generation", "--samples", tmp_path / "samples.npz", "--ref", tmp_path / "shards",
               "--fd-size", "32", "--batch-size", "8", "--device", "cpu", "--quiet", "--out", tmp_path / "eval.json"],
              capsys)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert "FD-opennsfw@32" in out and result["num_samples"] == 6 and result["num_reference"] == 18
    assert np.isfinite(result["FD-opennsfw@32"]) and result["FD-opennsfw@32"] > 0  # no Inception here: no FID
