"""Training recipes as the references train them: the loss scale of TiTok's stage 2, the ImageFolder recipe,
augmentation as a data setting (exact resume with it on)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from textok.data.augment import augment, load_size
from textok.errors import ConfigError
from textok.models.registry import resolve_tokenizer_config
from textok.train.config import load_train_config
from textok.train.tokenizer import build_components, generator_losses, train_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- TiTok stage 2: the reference's losses are on [0, 1] images ------------------------------------------
def test_titok_stage2_l2_is_the_references_mse_on_unit_range_images():
    """1d-tokenizer's stage 2 computes l2 (weight 1.0) on images in [0, 1]; textok's are in [-1, 1], so the
    recipe's l2 term must equal the reference's term on the same images mapped to [0, 1]."""
    cfg = load_train_config("titok-stage2", ["loss.perceptual=none", "loss.adversarial.weight=0"])
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    recon = (images + 0.3 * torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)).clamp(-1, 1)
    model = lambda x, text: (recon, {})  # noqa: E731  (a stand-in tokenizer that returns fixed reconstructions)
    _, terms, _ = generator_losses(model, None, None, images, None, cfg)
    reference = 1.0 * F.mse_loss((recon + 1) / 2, (images + 1) / 2)
    assert torch.allclose(terms["l2"].double(), reference, rtol=1e-6)


# ---- ImageFolder's recipe ------------------------------------------------------------------------------
def test_imagefolder_preset_trains_with_the_references_recipe(monkeypatch):
    """imagefolder-b-256 as the --config: lxa9867/ImageFolder's MSVR10P2 setting, not TexTok's defaults."""
    monkeypatch.delenv("TEXTOK_VGG16_WEIGHTS", raising=False)
    cfg = load_train_config("imagefolder-b-256")
    o, loss, adv = cfg.optim, cfg.loss, cfg.loss.adversarial
    assert cfg.model == "imagefolder-b-256"
    assert math.isclose(o.lr_for(1024), 2.4e-4) and math.isclose(o.lr_for(256), 6e-5)  # 2.4e-4 x batch / 1024
    assert math.isclose(o.lr_for(256) / o.lr * o.d_lr, 2e-4)  # the discriminator's 8e-4 scales alike
    assert o.betas == (0.9, 0.95) and o.weight_decay == 0.0 and o.d_weight_decay == 5e-4
    assert math.isclose(o.lr * o.min_lr_ratio, 5e-5, rel_tol=1e-3)
    assert loss.l2_weight == 1.0 and loss.perceptual == "auto" and loss.perceptual_weight == 1.0
    assert adv.kind == "hinge" and adv.weight == 0.5 and adv.adaptive and adv.lecam_weight == 1e-3
    assert adv.start_at(cfg.max_steps) == 70_000 and adv.start_at(1000) == 280  # 28 % of any run's length
    assert not adv.active(279, 1000) and adv.active(280, 1000)
    assert cfg.ema_decay == 0.9999 and cfg.data.crop_min == 0.8 and cfg.data.flip
    assert adv.diffaug and adv.diffaug_cutout == 0.2  # DiffAugment before the (StyleGAN) discriminator
    # LPIPS at 1.0 where VGG16 weights are given; open_nsfw at 0.1 replaces it otherwise
    assert loss.resolved_perceptual() == ("opennsfw", pytest.approx(0.1))
    assert load_train_config("imagefolder-b-256", ["loss.vgg16_weights=/x/vgg16.pth"]).loss.resolved_perceptual() \
        == ("lpips-vgg", 1.0)
    monkeypatch.setenv("TEXTOK_VGG16_WEIGHTS", "/x/vgg16.pth")
    assert loss.resolved_perceptual() == ("lpips-vgg", 1.0)
    # the CPU presets keep the CPU recipe
    assert load_train_config("imagefolder-s-32").loss.perceptual != "auto"
    with pytest.raises(ConfigError, match="start_step.*start_fraction"):
        load_train_config("imagefolder-b-256", ["loss.adversarial.start_step=100"])


def test_batch_scaled_lr_and_discriminator_weight_decay_reach_the_optimizers(tmp_path):
    """lr_batch scales the peak lr to the run's global batch (batch_size x grad_accum x processes), and the
    discriminator's AdamW gets d_weight_decay."""
    base = ["batch_size=4", "grad_accum=2", "data.train_size=16", "data.val_size=4", "log_every=1", "sample_every=0",
            "optim.warmup_steps=0", "optim.min_lr_ratio=1", "optim.lr=1e-3", "optim.lr_batch=32", "max_steps=2",
            "ckpt_every=2", "model.text_in_encoder=false", "model.text_in_decoder=false", "loss.perceptual=none",
            "loss.adversarial.weight=0.1", "loss.adversarial.start_step=0", "optim.d_weight_decay=0.005"]
    cfg = load_train_config("textok-tiny", base)
    train_tokenizer(cfg, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isclose(e["lr"], 1e-3 * 8 / 32) for e in log)
    parts, _ = build_components(cfg, *resolve_tokenizer_config(cfg.model, cfg.model_overrides), torch.device("cpu"))
    assert parts.opt_d.param_groups[0]["weight_decay"] == 0.005


# ---- augmentation ---------------------------------------------------------------------------------------
def test_random_crops_and_flips():
    L, S = 20, 16
    ramp = torch.arange(L, dtype=torch.float32).view(1, 1, 1, L).expand(64, 3, L, L) / L * 2 - 1  # x position
    out = augment(ramp, S, crop_min=0.8, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, S, S)
    again = augment(ramp, S, crop_min=0.8, flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # a pure function of the generator
    rising = out[:, 0, 0, -1] > out[:, 0, 0, 0]
    assert 20 < int(rising.sum()) < 44  # about half are mirrored
    spans = (out[:, 0, 0, :].max(1).values - out[:, 0, 0, :].min(1).values)
    assert spans.min() < spans.max() - 0.1  # crops of different sizes (wider crops span more of the ramp)
    assert torch.equal(augment(ramp[:, :, :S, :S], S), ramp[:, :, :S, :S])  # nothing asked: unchanged
    flipped = augment(ramp[:, :, :S, :S], S, flip=True, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(f, r) or torch.equal(f, r.flip(-1)) for f, r in zip(flipped, ramp[:, :, :S, :S]))
    assert load_size(16, 0.8) == 20 and load_size(256, 0.8) == 320 and load_size(16, 1.0) == 16
    with pytest.raises(ConfigError, match="crop_min"):
        load_train_config("textok-tiny", ["data.crop_min=0"])


def test_resume_is_bit_exact_with_augmentation(tmp_path):
    """2N steps == N steps, stop, resume to 2N, with random crops and flips on; and the augmentation changes
    what is trained."""
    base = ["batch_size=4", "data.train_size=16", "data.val_size=4", "log_every=1", "sample_every=0",
            "optim.warmup_steps=2", "optim.lr=1e-3", "model.text_in_encoder=false", "model.text_in_decoder=false",
            "loss.perceptual=none", "loss.adversarial.weight=0", "ckpt_every=2"]
    aug = ["data.crop_min=0.8", "data.flip=true"]
    train_tokenizer(load_train_config("textok-tiny", [*base, *aug, "max_steps=4"]), tmp_path / "a", progress=False)
    train_tokenizer(load_train_config("textok-tiny", [*base, *aug, "max_steps=2"]), tmp_path / "b", progress=False)
    train_tokenizer(load_train_config("textok-tiny", [*base, *aug, "max_steps=4"]), tmp_path / "b", progress=False)
    train_tokenizer(load_train_config("textok-tiny", [*base, "max_steps=4"]), tmp_path / "c", progress=False)
    a, b, c = (load_file(str(tmp_path / run / "final/model.safetensors")) for run in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---- ImageFolder's semantic InfoNCE across processes -------------------------------------------------------
def _semantic_setup():
    """A tiny ImageFolder with a semantic branch (a small frozen random teacher in place of open_nsfw), a batch
    of 8 images, the quantized maps as leaves, and which rows quantizer dropout kept."""
    from textok.models.imagefolder import ImageFolder, ImageFolderConfig

    torch.manual_seed(0)
    model = ImageFolder(ImageFolderConfig.preset("imagefolder-tiny").override(
        ["semantic_teacher=opennsfw", "semantic_branches=all"])).train()
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 1024)).requires_grad_(False)
    object.__setattr__(model, "_teacher", teacher)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    zq = torch.randn(8, model.config.num_tokens, model.config.token_channels, generator=g)
    rows = torch.tensor([True, True, False, True, True, True, True, False])
    return model, images, zq, rows


def _semantic_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, images, zq, rows = _semantic_setup()
        half = slice(rank * 4, rank * 4 + 4)
        mine = zq[half].clone().requires_grad_(True)
        loss = model.semantic_loss(images[half], mine, rows[half])
        loss.backward()
        torch.save({"loss": loss.detach(), "zq_grad": mine.grad, "proj_grad": model.semantic_proj.weight.grad},
                   f"{out}-rank{rank}.pt")
        # every process's sends of the backward's exchange done before either tears its group down (a process
        # leaving with a send still in flight was aborted by gloo: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_semantic_info_nce_gathers_every_process_with_gradient(tmp_path):
    """Two gloo processes, each with half the batch: each computes the one-process loss over the whole batch,
    and their gradients, averaged as DDP averages them, are the one-process gradients (negatives x world size,
    as the reference's gather_with_grad)."""
    import socket

    import torch.multiprocessing as mp

    model, images, zq, rows = _semantic_setup()
    whole = zq.clone().requires_grad_(True)
    want = model.semantic_loss(images, whole, rows)
    want.backward()
    local = _semantic_setup()[0].semantic_loss(images[:4], zq[:4], rows[:4])  # what each process saw before
    assert not math.isclose(float(local.detach()), float(want.detach()), rel_tol=1e-3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_semantic_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"r-rank{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        assert torch.allclose(got[r]["loss"], want.detach(), rtol=1e-5)
    zq_grad = torch.cat([got[0]["zq_grad"], got[1]["zq_grad"]]) / 2  # DDP's average over the processes
    assert torch.allclose(zq_grad, whole.grad, rtol=1e-4, atol=1e-7)
    proj_grad = (got[0]["proj_grad"] + got[1]["proj_grad"]) / 2
    assert torch.allclose(proj_grad, model.semantic_proj.weight.grad, rtol=1e-4, atol=1e-7)


# ---- DiffAugment before the discriminator ---------------------------------------------------------------
def test_diffaugment_parts():
    from textok.losses.diffaug import diff_augment

    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    assert torch.equal(diff_augment(x, g()), diff_augment(x, g()))  # a pure function of the generator
    assert not torch.equal(diff_augment(x, g()), diff_augment(x, torch.Generator().manual_seed(4)))
    # translation alone: each image shifted by whole pixels, at most 2 (1/8 of 16) each way, zeros shifted in
    moved = diff_augment(x, g(), cutout=0, color=False)
    for img, out in zip(x, moved):
        padded = F.pad(img, (2, 2, 2, 2))
        assert any(torch.equal(out, padded[:, 2 - dy:18 - dy, 2 - dx:18 - dx]) for dy in range(-2, 3)
                   for dx in range(-2, 3))
    # colour alone, on grey images: brightness + U(-0.5, 0.5) (saturation and contrast leave flat grey alone)
    grey = torch.full((32, 3, 16, 16), 0.1, dtype=torch.float64)
    shifted = diff_augment(grey, g(), cutout=0, translation=0) - grey
    assert torch.allclose(shifted, shifted[:, :1, :1, :1].expand_as(shifted))
    assert shifted.abs().max() <= 0.5 and shifted.std() > 0.1
    # cutout alone: one zeroed square of round(0.2 x 16) = 3 px a side per image (clipped at the border)
    holes = diff_augment(torch.ones(32, 3, 16, 16, dtype=torch.float64), g(), translation=0, color=False) == 0
    assert torch.all(holes.sum((1, 2, 3)) <= 3 * 9) and torch.all(holes.sum((1, 2, 3)) > 0)
    assert holes.sum().item() > 32 * 3 * 4  # most squares lie inside
    # differentiable in the images (the generator's pass goes through it)
    leaf = x.clone().requires_grad_(True)
    diff_augment(leaf, g()).square().sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_resume_is_bit_exact_with_diffaugment(tmp_path, monkeypatch):
    """DiffAugment reaches both passes through the discriminator in training, and a run with it (and the GAN,
    crops and flips) resumes bit for bit."""
    import textok.train.tokenizer as tok_module

    calls = []
    real = tok_module.diff_augment
    monkeypatch.setattr(tok_module, "diff_augment", lambda x, **kw: calls.append(x.shape[0]) or real(x, **kw))
    base = ["batch_size=4", "data.train_size=16", "data.val_size=4", "log_every=1", "sample_every=0",
            "optim.warmup_steps=2", "optim.lr=1e-3", "model.text_in_encoder=false", "model.text_in_decoder=false",
            "loss.perceptual=none", "loss.adversarial.weight=0.1", "loss.adversarial.start_step=0",
            "loss.adversarial.diffaug=true", "data.crop_min=0.8", "data.flip=true", "ckpt_every=2"]
    train_tokenizer(load_train_config("textok-tiny", [*base, "max_steps=4"]), tmp_path / "a", progress=False)
    assert calls == [4, 4, 4] * 4  # per step: the generator's pass, then real and fake in the discriminator's
    train_tokenizer(load_train_config("textok-tiny", [*base, "max_steps=2"]), tmp_path / "b", progress=False)
    train_tokenizer(load_train_config("textok-tiny", [*base, "max_steps=4"]), tmp_path / "b", progress=False)
    for part in ("model", "disc"):
        a = load_file(str(tmp_path / "a/checkpoints/step-0000004" / f"{part}.safetensors"))
        b = load_file(str(tmp_path / "b/checkpoints/step-0000004" / f"{part}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), part
