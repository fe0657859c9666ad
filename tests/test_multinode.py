"""Training on streaming shards across processes: disjoint shards per rank, exact resume after a kill."""

import json
import os
import socket

import pytest
import torch

from test_shards import _image_folder
from textok.cli import main
from textok.train.checkpoint import CheckpointManager
from textok.train.config import load_train_config
from textok.train.tokenizer import train_tokenizer

COMMON = ["batch_size=2", "data.val_split=val", "log_every=1", "sample_every=0", "optim.warmup_steps=2",
          "optim.lr=1e-3", "model.text_in_encoder=false", "model.text_in_decoder=false", "loss.perceptual=none",
          "loss.adversarial.weight=0", "device=cpu", "ckpt_every=2", "keep_last=5", "data.shuffle_buffer=5",
          "data.train_size=0"]  # stream every shard (a tiny preset trains with the demo recipe, 2,000 images)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("mn")
    _image_folder(base / "src", n=48, splits=("train", "val"))
    assert main(["make-shards", str(base / "src"), "--out", str(base / "sh"), "--shard-size", "6", "--no-progress"]) == 0
    return base / "sh"


def _worker(rank, world, port, out, overrides, trace, kill_at):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from textok.train import data_source

    real = data_source.BatchSource.batches

    def recorded(self, start):
        for k, batch in enumerate(real(self, start), start):
            if kill_at is not None and k == kill_at:
                os._exit(1)  # killed: no checkpoint, no clean-up, like a lost node
            with open(f"{trace}-rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"micro": k, "index": batch["index"].tolist()}) + "\n")
            yield batch

    data_source.BatchSource.batches = recorded
    train_tokenizer(load_train_config("textok-tiny", overrides), out, progress=False)


def _run(out, overrides, trace, kill_at=None):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(out), overrides, str(trace), kill_at), nprocs=2,
                       start_method="spawn")


def _trace(path):
    return {e["micro"]: e["index"] for e in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_and_resume_after_a_kill_exactly(shards, tmp_path):
    import torch.multiprocessing as mp

    overrides = [f"data.source={shards}", "max_steps=5", *COMMON]
    _run(tmp_path / "a", overrides, tmp_path / "a")  # uninterrupted
    with pytest.raises(mp.ProcessExitedException):
        _run(tmp_path / "b", overrides, tmp_path / "b1", kill_at=3)  # killed while fetching step 3's batch
    assert CheckpointManager(tmp_path / "b/checkpoints").latest().name == "step-0000002"
    _run(tmp_path / "b", overrides, tmp_path / "b2")  # the same command again: resumes from step 2

    a = [_trace(tmp_path / f"a-rank{r}.jsonl") for r in range(2)]
    resumed = [_trace(tmp_path / f"b2-rank{r}.jsonl") for r in range(2)]
    for r in range(2):
        assert sorted(resumed[r]) == [2, 3, 4] and all(resumed[r][k] == a[r][k] for k in (2, 3, 4))
    # each rank reads whole shards (6 samples each) that the other rank never touches
    shard_sets = [{i // 6 for batch in a[r].values() for i in batch} for r in range(2)]
    assert not shard_sets[0] & shard_sets[1]
    # and the resumed run ends where the uninterrupted one did, bit for bit
    sa, ma = CheckpointManager.load(tmp_path / "a/checkpoints/step-0000005")
    sb, mb = CheckpointManager.load(tmp_path / "b/checkpoints/step-0000005")
    for part in ("model", "ema", "opt"):
        flat_a, flat_b = _flat(sa[part]), _flat(sb[part])
        assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part
    assert ma["data_position"] == mb["data_position"] and ma["data_position"]["kind"] == "shards"
    assert ma["data_position"]["world"] == 2


def _flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}.{i}").items()}
    return {prefix: torch.tensor(float(obj))} if isinstance(obj, (int, float)) else {}


def test_one_process_on_shards_resumes_bit_exactly_with_workers(shards, tmp_path):
    """N + N steps == 2N steps on shards, with two DataLoader workers each reading its own shards."""
    base = ["model.text_in_encoder=false", "model.text_in_decoder=false", "loss.perceptual=none",
            "loss.adversarial.weight=0", f"data.source={shards}", "data.val_split=val", "data.workers=2",
            "batch_size=3", "log_every=1", "sample_every=0", "ckpt_every=3", "optim.warmup_steps=2", "optim.lr=1e-3",
            "data.train_size=0"]  # stream every shard (a tiny preset trains with the demo recipe, 2,000 images)
    train_tokenizer(load_train_config("textok-tiny", [*base, "max_steps=6"]), tmp_path / "a", progress=False)
    train_tokenizer(load_train_config("textok-tiny", [*base, "max_steps=3"]), tmp_path / "b", progress=False)
    train_tokenizer(load_train_config("textok-tiny", [*base, "max_steps=6"]), tmp_path / "b", progress=False)
    sa, ma = CheckpointManager.load(tmp_path / "a/checkpoints/step-0000006")
    sb, mb = CheckpointManager.load(tmp_path / "b/checkpoints/step-0000006")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert ma["data_position"] == mb["data_position"] == {
        "kind": "shards", "micro_batch": 6, "epoch": 0, "batch_in_epoch": 3, "stream": 0, "world": 1, "streams": 2,
        "shuffle_buffer": 1000}


@pytest.mark.slow
def test_fsdp_two_processes_match_ddp_and_checkpoints_load_into_one_process_model(tmp_path):
    """fsdp=true on 2 gloo processes (FSDP2 runs on the CPU in this torch): the update matches DDP's, the checkpoint
    and final/ load into a plain single-process model, and the run resumes from its checkpoint."""
    from textok.models.registry import build_tokenizer, load_tokenizer, resolve_tokenizer_config

    base = ["batch_size=2", "data.train_size=16", "data.val_size=4", "log_every=1", "sample_every=2",
            "optim.warmup_steps=2", "optim.lr=1e-3", "model.text_in_encoder=false", "model.text_in_decoder=false",
            "loss.perceptual=none", "loss.adversarial.weight=0", "device=cpu", "ckpt_every=3"]
    _run(tmp_path / "fsdp", [*base, "fsdp=true", "max_steps=3"], tmp_path / "t1")
    _run(tmp_path / "ddp", [*base, "max_steps=3"], tmp_path / "t2")
    torch.manual_seed(0)
    cfg = resolve_tokenizer_config("textok-tiny", ["text_in_encoder=false", "text_in_decoder=false"])
    init = build_tokenizer(*cfg).state_dict()
    fs, _ = CheckpointManager.load(tmp_path / "fsdp/checkpoints/step-0000003")
    dd, _ = CheckpointManager.load(tmp_path / "ddp/checkpoints/step-0000003")
    plain = build_tokenizer(*cfg)
    plain.load_state_dict(fs["model"])  # strict: the same keys and shapes as a single-process model
    delta = lambda w: torch.cat([(w[k] - init[k]).flatten() for k in init])  # noqa: E731
    d_fsdp, d_ddp = delta(fs["model"]), delta(dd["model"])
    assert d_ddp.norm() > 0 and (d_fsdp - d_ddp).norm() / d_ddp.norm() < 0.02
    final = load_tokenizer(tmp_path / "fsdp/final")
    assert all(torch.equal(final.state_dict()[k], fs["ema"][k]) for k in fs["ema"])
    assert (tmp_path / "fsdp/samples/step-0000002.png").is_file()
    assert isinstance(next(iter(fs["opt"]["state"])), str)  # optimizer state keyed by parameter name
    _run(tmp_path / "fsdp", [*base, "fsdp=true", "max_steps=4"], tmp_path / "t3")  # resumes from step 3
    assert CheckpointManager(tmp_path / "fsdp/checkpoints").latest().name == "step-0000004"


def _signalled_worker(rank, world, port, out, overrides, signal_at):
    """Rank 1 alone receives SIGTERM while fetching micro-batch ``signal_at`` (a scheduler that signals one task)."""
    import signal
    import threading

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from textok.train import data_source

    real = data_source.BatchSource.batches

    def signalled(self, start):
        for k, batch in enumerate(real(self, start), start):
            if rank == 1 and k == signal_at:  # to the main thread: one of gloo's threads may abort on EINTR
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            yield batch

    data_source.BatchSource.batches = signalled
    from textok.errors import Interrupted

    try:
        train_tokenizer(load_train_config("textok-tiny", overrides), out, progress=False)
    except Interrupted as err:  # torch.multiprocessing swallows a KeyboardInterrupt: report it through a file
        with open(f"{out}-rank{rank}.interrupted", "w") as f:
            f.write(f"{err.signum} {err}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(shards, tmp_path):
    """Ranks agree on stopping at the next log step: one checkpoint at that step, every rank exits interrupted
    (none runs on into a collective the others left), and the same command resumes to the end."""
    import torch.multiprocessing as mp

    overrides = [f"data.source={shards}", "max_steps=6", *COMMON, "log_every=2", "ckpt_every=100"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_signalled_worker, args=(2, port, str(tmp_path / "r"), overrides, 2), nprocs=2,
                       start_method="spawn")
    for rank in range(2):  # both stop as interrupted (exit 143 from the CLI), not only the one signalled
        report = (tmp_path / f"r-rank{rank}.interrupted").read_text()
        assert report.startswith("15 ") and "after saving a checkpoint" in report
    # signalled while fetching step 3's batch: seen after step 3, agreed at step 4 (the next log step)
    assert [p.name for p in CheckpointManager(tmp_path / "r/checkpoints").all()] == ["step-0000004"]
    assert not (tmp_path / "r/final").exists()
    _run(tmp_path / "r", overrides, tmp_path / "resumed")
    assert (tmp_path / "r/final/model.safetensors").is_file()
    assert sorted(_trace(tmp_path / "resumed-rank0.jsonl")) == [4, 5]
