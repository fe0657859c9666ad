"""fsdp=true for the generator loop (DiT, MaskGIT, VAR) on 2 gloo processes: the same weights as DDP, checkpoints
and final/ that load into a single-process model, resume after a stop, and the checkpoint forms across the switch."""

import os
import shutil
import socket

import pytest
import torch

from textok.distributed import DistInfo
from textok.errors import TextokError
from textok.generate import extract_latents
from textok.models.imagefolder import ImageFolder, ImageFolderConfig
from textok.models.registry import load_generator
from textok.models.textok import TexTok, TexTokConfig
from textok.models.titok import TiTok, TiTokConfig
from textok.train import fsdp
from textok.train.checkpoint import CheckpointManager
from textok.train.config import load_generator_config
from textok.train.generator import train_generator

# two blocks per generator (two FSDP units besides the root), 4 latents per process and step
COMMON = ["batch_size=4", "log_every=1", "optim.warmup_steps=1", "optim.lr=1e-3", "ema_decay=0.9", "device=cpu",
          "ckpt_every=2", "keep_last=5"]
KINDS = {"dit": ("dit-tiny", ["model.width=32", "model.depth=2", "model.heads=2"]),
         "maskgit": ("maskgit-tiny", ["model.transformer.width=32", "model.transformer.depth=2",
                                      "model.transformer.heads=2"]),
         "var": ("var-tiny", ["model.width=32", "model.depth=2", "model.heads=2"])}


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """16 scenes' latents per kind, from untrained tiny tokenizers: TexTok tokens, TiTok codes, ImageFolder codes."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fsdp-gen")
    torch.manual_seed(0)
    TexTok(TexTokConfig.preset("textok-tiny").override(["text_in_encoder=false", "text_in_decoder=false"])
           ).save_pretrained(root / "textok")
    TiTok(TiTokConfig.preset("titok-tiny")).save_pretrained(root / "titok")
    ImageFolder(ImageFolderConfig.preset("imagefolder-tiny")).save_pretrained(root / "imagefolder")
    for kind, tok in (("dit", "textok"), ("maskgit", "titok"), ("var", "imagefolder")):
        extract_latents(root / tok, "scenes", root / kind, num=16, progress=False)
    return root


def _config(kind, lat, overrides):
    preset, model = KINDS[kind]
    return load_generator_config(preset, [f"latents={lat}", *COMMON, *model, *overrides])


def _worker(rank, world, port, kind, lat, out, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train_generator(_config(kind, lat, overrides), out, progress=False)


def _run(kind, lat, out, overrides):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, kind, str(lat), str(out), overrides), nprocs=2, start_method="spawn")


def _initial_weights(run):
    """The weights a run started from: the loop seeds torch with cfg.seed (0) and then builds the model."""
    model, _ = load_generator(run / "final")
    torch.manual_seed(0)
    return type(model)(model.config).state_dict()


def _assert_same_training(fsdp_state, ddp_state, init, steps, what):
    """FSDP and DDP reduce the gradients and their clipping norm in other orders and step AdamW over shards or
    whole tensors: their updates (weights - init, in float64) agree to float32 rounding. Allowed: sqrt(eps) of the
    largest update (two routes to the same update, :mod:`numerics`) plus one float32 rounding of the largest stored
    weight per step (the weights are float32 numbers). A lost gradient, shard or optimizer moment moves the weights
    by the order of the update itself (lr per step), far above that."""
    assert fsdp_state.keys() == ddp_state.keys() == init.keys(), what
    flat = lambda s: torch.cat([(s[k].double() - init[k].double()).flatten() for k in init])  # noqa: E731
    d_fsdp, d_ddp = flat(fsdp_state), flat(ddp_state)
    largest_weight = max(float(v.abs().max()) for v in ddp_state.values())
    eps = torch.finfo(torch.float32).eps
    allowed = eps ** 0.5 * float(d_ddp.abs().max()) + steps * eps * largest_weight
    diff = float((d_fsdp - d_ddp).abs().max())
    assert float(d_ddp.abs().max()) > 0, f"{what}: training did not move the weights"
    assert diff <= allowed, f"{what}: FSDP and DDP differ by {diff:.3g}, more than rounding allows ({allowed:.3g})"


@pytest.mark.slow
def test_dit_under_fsdp_matches_ddp_resumes_and_loads_on_one_process(latents, tmp_path):
    lat = latents / "dit"
    _run("dit", lat, tmp_path / "ddp", ["max_steps=4"])
    init = _initial_weights(tmp_path / "ddp")
    _run("dit", lat, tmp_path / "fsdp", ["fsdp=true", "max_steps=2"])  # stopped after 2 steps...
    assert CheckpointManager(tmp_path / "fsdp/checkpoints").latest().name == "step-0000002"
    _run("dit", lat, tmp_path / "fsdp", ["fsdp=true", "max_steps=4"])  # ...and the same command resumed to 4
    for step in (2, 4):
        fs, _ = CheckpointManager.load(tmp_path / f"fsdp/checkpoints/step-{step:07d}")
        dd, _ = CheckpointManager.load(tmp_path / f"ddp/checkpoints/step-{step:07d}")
        for part in ("model", "ema"):
            _assert_same_training(fs[part], dd[part], init, step, f"{part} after {step} steps")
    assert isinstance(next(iter(fs["opt"]["state"])), str)  # optimizer state keyed by parameter name
    model, record = load_generator(tmp_path / "fsdp/final")  # one process, no FSDP
    assert record["train_step"] == 4 and record["model_type"] == "dit"
    assert all(torch.equal(model.state_dict()[k], fs["ema"][k]) for k in fs["ema"])

    # the checkpoint forms across the switch, as for the tokenizer: an FSDP checkpoint resumes without FSDP...
    shutil.copytree(tmp_path / "fsdp", tmp_path / "plain", ignore=shutil.ignore_patterns("final"))
    train_generator(_config("dit", lat, ["max_steps=5"]), tmp_path / "plain", progress=False)
    assert CheckpointManager(tmp_path / "plain/checkpoints").latest().name == "step-0000005"
    # ...and a DDP checkpoint (optimizer state by position) is refused by an FSDP run, in one line
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException, match="saved without fsdp; resume it with fsdp=false"):
        _run("dit", lat, tmp_path / "ddp", ["fsdp=true", "max_steps=5"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["maskgit", "var"])
def test_maskgit_and_var_under_fsdp_match_ddp(latents, tmp_path, kind):
    lat = latents / kind
    _run(kind, lat, tmp_path / "ddp", ["max_steps=2"])
    init = _initial_weights(tmp_path / "ddp")
    _run(kind, lat, tmp_path / "fsdp", ["fsdp=true", "max_steps=2"])
    fs, _ = CheckpointManager.load(tmp_path / "fsdp/checkpoints/step-0000002")
    dd, _ = CheckpointManager.load(tmp_path / "ddp/checkpoints/step-0000002")
    for part in ("model", "ema"):
        _assert_same_training(fs[part], dd[part], init, 2, f"{kind} {part}")
    model, record = load_generator(tmp_path / "fsdp/final")
    assert record["model_type"] == kind
    assert all(torch.equal(model.state_dict()[k], fs["ema"][k]) for k in fs["ema"])


def test_a_model_without_transformer_blocks_is_refused():
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TextokError, match="no transformer blocks in Sequential"):
        fsdp.shard(flat, flat, DistInfo())
