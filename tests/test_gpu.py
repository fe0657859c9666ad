"""GPU correctness (marked ``gpu``; skipped without CUDA). `benchmarks/gpu_suite.py` runs these first on a lent GPU.

bf16 autocast forward/backward of every model against float32 (TF32 off), ``torch.compile`` against eager,
CUDA-graph sampling against the eager loop, exact resume of a checkpoint written on the GPU, and an NCCL
process group of one. The compile test is last: it is the slowest, and the suite's time limit should cut it
rather than the others. Tolerances follow the precision: bf16 operands give relative errors of 1e-3..1e-2 per
matmul, a few times that through a deep stack; the same kernels replayed give identical numbers.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_suite.py)")]

DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _strict_fp32():
    """float32 references are float32, not TF32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _textok(kind: str):
    from textok.models.registry import build_tokenizer, resolve_tokenizer_config

    preset = {"textok": "textok-s-64-32", "titok": "titok-s-32-16"}[kind]
    torch.manual_seed(0)
    model = build_tokenizer(*resolve_tokenizer_config(preset, ())).to(DEV)
    size = model.config.image_size
    images = torch.rand(8, 3, size, size, device=DEV) * 2 - 1
    text = None
    if model.config.uses_text:
        from textok.text.embeddings import TextEmbeddings

        g = torch.Generator(device=DEV).manual_seed(1)
        mask = torch.arange(12, device=DEV)[None] < torch.tensor([12, 7, 9, 12, 3, 12, 10, 5], device=DEV)[:, None]
        text = TextEmbeddings(torch.randn(8, 12, model.config.text_dim, device=DEV, generator=g), mask)
    return model, images, text


def _loss_and_grads(model, run, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = run()
    loss = out.float().square().mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.detach().float(), grads


@pytest.mark.parametrize("kind", ["textok", "titok", "dit", "maskgit"])
def test_bf16_autocast_forward_backward_matches_fp32(kind: str) -> None:
    if kind == "textok":
        model, images, text = _textok(kind)
        run = lambda: model(images, text)[0]  # noqa: E731
    elif kind == "titok":
        # The quantizer's nearest-code choice may flip between precisions for near-ties, so the comparison is
        # on the encoder output; the whole training forward (quantizer, decoder) must run and be finite.
        model, images, _ = _textok(kind)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            recon, terms = model.training_losses(images)
            (recon.float().square().mean() + sum(v for k, v in terms.items() if not k.startswith("metric/"))).backward()
        assert torch.isfinite(recon).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        run = lambda: model.encoder(images, None)  # noqa: E731
    elif kind == "dit":
        from textok.models.dit import DiT, DiTConfig

        torch.manual_seed(0)
        model = DiT(DiTConfig.preset("dit-s").override({"num_tokens": 32, "num_classes": 10})).to(DEV).eval()
        for p in model.parameters():  # adaLN-zero starts as the identity: give every branch weight
            torch.nn.init.normal_(p, std=0.02)
        x = torch.randn(8, 32, 8, device=DEV)
        t = torch.randint(0, 1000, (8,), device=DEV)
        y = torch.randint(0, 10, (8,), device=DEV)
        run = lambda: model(x, t, y)  # noqa: E731
    else:
        from textok.models.maskgit import MaskGIT, MaskGITConfig
        from textok.models.vit import ViTConfig

        torch.manual_seed(0)
        model = MaskGIT(MaskGITConfig(num_tokens=32, codebook_size=512, num_classes=10,
                                      transformer=ViTConfig(width=256, depth=4, heads=4))).to(DEV).eval()
        ids = torch.randint(0, 513, (8, 32), device=DEV)
        y = torch.randint(0, 10, (8,), device=DEV)
        run = lambda: model(ids, y)  # noqa: E731
    out32, g32 = _loss_and_grads(model, run, bf16=False)
    out16, g16 = _loss_and_grads(model, run, bf16=True)
    assert torch.isfinite(out16).all() and torch.isfinite(g16).all()
    assert rel(out16, out32) < 3e-2, rel(out16, out32)
    assert rel(g16, g32) < 8e-2, rel(g16, g32)


@pytest.mark.parametrize("objective,sampler", [("flow", "euler"), ("flow", "heun"), ("ddpm", "ddim")])
def test_cuda_graph_sampling_equals_the_eager_loop(objective: str, sampler: str) -> None:
    from textok.diffusion import DiffusionConfig, create_diffusion
    from textok.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    dit = DiT(DiTConfig.preset("dit-tiny").override({"learn_sigma": objective == "ddpm"})).to(DEV).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.02)
    diffusion = create_diffusion(DiffusionConfig.preset("flow" if objective == "flow" else "dit"))
    noise = torch.randn(6, dit.config.num_tokens, dit.config.in_channels, device=DEV)
    kw = {"y": torch.arange(6, device=DEV) % dit.config.num_classes}
    common = dict(steps=12, sampler=sampler, cfg_scale=3.0, model_kwargs=kw, noise=noise)
    eager = diffusion.sample(dit, noise.shape, **common)
    graphed = diffusion.sample(dit, noise.shape, cuda_graph=True, **common)
    assert torch.isfinite(graphed).all()
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)


def test_checkpoint_written_on_gpu_resumes_bit_exactly(tmp_path) -> None:
    """Uninterrupted == stopped at 3 and resumed, on the GPU (math attention and deterministic cuDNN, so the
    comparison is about the checkpoint, not about atomics in a kernel; a repeat run checks that premise)."""
    from safetensors.torch import load_file
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from textok.train.config import load_train_config
    from textok.train.tokenizer import train_tokenizer

    base = ["batch_size=4", "data.train_size=24", "data.val_size=4", "log_every=1", "sample_every=0",
            "optim.warmup_steps=2", "optim.lr=1e-3", "loss.perceptual=none", "loss.adversarial.start_step=2",
            "loss.adversarial.weight=0.1", "model.text_in_encoder=false", "model.text_in_decoder=false",
            "device=cuda", "precision=bf16", "ckpt_every=3"]
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        with sdpa_kernel(SDPBackend.MATH):
            for run, steps in (("a", 6), ("c", 6), ("b", 3), ("b", 6)):
                train_tokenizer(load_train_config("textok-tiny", base + [f"max_steps={steps}"]), tmp_path / run,
                                progress=False)
    finally:
        torch.backends.cudnn.deterministic = before
    for part in ("model", "ema", "disc", "opt", "opt_d"):
        a, b, c = (load_file(str(tmp_path / r / "checkpoints/step-0000006" / f"{part}.safetensors")) for r in "abc")
        for k in a:
            assert torch.equal(a[k], c[k]), ("two uninterrupted runs differ", part, k)
            assert torch.equal(a[k], b[k]), (part, k)


def test_nccl_process_group_of_one() -> None:
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, device=DEV)
        dist.all_reduce(x)
        assert torch.equal(x, torch.arange(4.0, device=DEV))
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2).to(DEV), device_ids=[0])
        model(torch.randn(3, 8, device=DEV)).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    assert os.environ.get("RANK") is None  # the group came from init_method, not from the environment


def test_fp8_linears_match_bf16_and_skip_the_mask_when_no_caption_is_padded() -> None:
    """The suite's fast tokenizer paths on the card: attention without a mask for unpadded captions gives the masked
    path's numbers (bf16 rounding apart: another kernel), and FP8 blocks stay within the e4m3 rounding of bf16."""
    from textok.models.fp8 import fp8_supported, use_fp8_linears
    from textok.models.textok import TexTok, TexTokConfig
    from textok.text.embeddings import TextEmbeddings

    torch.manual_seed(0)
    model = TexTok(TexTokConfig.preset("textok-s-64-32")).to(DEV, torch.bfloat16).eval()
    images = torch.rand(16, 3, 64, 64, device=DEV, dtype=torch.bfloat16) * 2 - 1
    states = torch.randn(16, 12, model.config.text_dim, device=DEV, dtype=torch.bfloat16)
    ones = torch.ones(16, 12, dtype=torch.bool, device=DEV)
    with torch.inference_mode():
        masked, _ = model(images, TextEmbeddings(states, ones, dense=False))
        unmasked, _ = model(images, TextEmbeddings(states, ones, dense=True))
        assert rel(unmasked, masked) < 2e-2
        if not fp8_supported(DEV):
            pytest.skip(f"{torch.cuda.get_device_name()} has no FP8 matmuls")
        use_fp8_linears(model)
        fp8, _ = model(images, TextEmbeddings(states, ones, dense=True))
    assert torch.isfinite(fp8).all()
    # the CPU's emulation of the same e4m3 maths gives 7.1% on this random-weight model (8 blocks; bf16: 0.8%)
    assert rel(fp8, unmasked) < 0.15, rel(fp8, unmasked)


def test_compile_matches_eager_in_bf16() -> None:
    model, images, text = _textok("textok")
    model.eval()
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(images, text)[0].float()
        fast = compiled(images, text)[0].float()
    assert rel(fast, eager) < 2e-2, rel(fast, eager)

    from textok.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    dit = DiT(DiTConfig.preset("dit-s").override({"num_tokens": 32, "num_classes": 10})).to(DEV).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dit = dit.to(torch.bfloat16)
    x, t, y = torch.randn(16, 32, 8, device=DEV), torch.randint(0, 1000, (16,), device=DEV), torch.arange(16, device=DEV) % 10
    with torch.no_grad():
        eager = dit(x, t, y).float()
        for block in dit.blocks:  # regional compilation: one compiled block serves all of them
            block.compile()
        fast = dit(x, t, y).float()
    assert rel(fast, eager) < 2e-2, rel(fast, eager)
