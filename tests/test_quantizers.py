"""Vector quantiser and diagonal-Gaussian bottleneck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from textok.errors import ConfigError, TextokError
from textok.models.quantizers import (
    DiagonalGaussian,
    QuantizerConfig,
    VectorQuantizer,
    build_quantizer,
)


def _two_code_vq(l2: bool = False) -> VectorQuantizer:
    vq = VectorQuantizer(num_codes=2, code_dim=2, l2_normalized=l2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return vq


def test_two_code_example_by_hand() -> None:
    vq = _two_code_vq()
    z = torch.tensor([[[0.9, 0.2], [0.1, 0.5], [0.6, 0.6]]])  # last one is a tie -> first code (argmin)
    out = vq(z)
    assert out.codes.dtype == torch.int64 and out.codes.tolist() == [[0, 1, 0]]
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert torch.allclose(out.quantized[0], q)
    # squared errors: [0.01+0.04, 0.01+0.25, 0.16+0.36] = [0.05, 0.26, 0.52]; mean over 6 elements
    mse = (0.05 + 0.26 + 0.52) / 6
    assert math.isclose(float(out.losses["codebook"].detach()), mse, rel_tol=1e-5)
    assert math.isclose(float(out.losses["commitment"].detach()), 0.25 * mse, rel_tol=1e-5)
    assert math.isclose(float(out.losses["loss"].detach()), 1.25 * mse, rel_tol=1e-5)
    # usage: both codes used; code probabilities [2/3, 1/3] -> perplexity exp(H)
    assert float(out.metrics["usage"]) == 1.0
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert math.isclose(float(out.metrics["perplexity"]), math.exp(h), rel_tol=1e-5)


def test_loss_gradients_go_to_the_right_places() -> None:
    vq = _two_code_vq()
    z = torch.tensor([[[0.9, 0.2]]], requires_grad=True)
    out = vq(z)
    out.losses["codebook"].backward()
    assert z.grad is None or torch.all(z.grad == 0)  # codebook loss moves only the codes
    # d/de0 mean((e0 - z)^2) over 2 elements = (e0 - z) = [0.1, -0.2]
    assert torch.allclose(vq.embedding.weight.grad[0], torch.tensor([0.1, -0.2]), atol=1e-6)
    assert torch.all(vq.embedding.weight.grad[1] == 0)
    vq.zero_grad()
    z.grad = None
    vq(z).losses["commitment"].backward()
    # d/dz 0.25 * mean((z - e0)^2) = 0.25 * (z - e0) = [-0.025, 0.05]
    assert torch.allclose(z.grad[0, 0], torch.tensor([-0.025, 0.05]), atol=1e-6)
    assert vq.embedding.weight.grad is None or torch.all(vq.embedding.weight.grad == 0)


def test_straight_through_gradient_is_identity() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=4, l2_normalized=False)
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert torch.allclose(out.quantized, vq.codebook()[out.codes])


def test_straight_through_with_l2_is_the_normalisation_jacobian() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=4, l2_normalized=True)
    z = torch.randn(2, 5, 4, requires_grad=True)
    upstream = torch.randn_like(z)
    (vq(z).quantized * upstream).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * upstream).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


def test_codes_are_the_nearest_and_in_range() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=64, code_dim=8, l2_normalized=True)
    z = torch.randn(3, 7, 8)
    out = vq(z)
    assert out.codes.shape == (3, 7) and out.codes.min() >= 0 and out.codes.max() < 64
    # brute-force cosine nearest neighbour
    sims = F.normalize(z, dim=-1) @ F.normalize(vq.embedding.weight, dim=-1).t()
    assert torch.equal(out.codes, sims.argmax(-1))
    assert torch.equal(vq.quantize_codes(z), out.codes)
    assert torch.allclose(vq.decode_codes(out.codes), out.quantized, atol=1e-6)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(3, 7), atol=1e-5)


def test_decode_codes_out_of_range_errors() -> None:
    vq = VectorQuantizer(num_codes=8, code_dim=4)
    with pytest.raises(TextokError, match=r"\[0, 7\]"):
        vq.decode_codes(torch.tensor([[0, 8]]))
    with pytest.raises(TextokError, match=r"\[0, 7\]"):
        vq.decode_codes(torch.tensor([-1]))
    with pytest.raises(TextokError, match="integer"):
        vq.decode_codes(torch.tensor([0.0]))
    assert vq.decode_codes(torch.tensor([[1, 7]])).shape == (1, 2, 4)


def test_wrong_width_errors() -> None:
    vq = VectorQuantizer(num_codes=8, code_dim=4)
    with pytest.raises(TextokError, match="code_dim"):
        vq(torch.zeros(1, 3, 5))


def test_dead_code_restart_revives_unused_codes() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, code_dim=2, l2_normalized=False, dead_code_steps=3)
    with torch.no_grad():  # code 0 near the data, codes 1-7 far away: only code 0 is ever chosen
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0]] + [[100.0 + i, 100.0] for i in range(7)]))
    vq.train()
    data = torch.randn(1, 32, 2)
    for _ in range(3):
        out = vq(data)
        assert out.codes.unique().tolist() == [0]
    assert vq.unused_steps.tolist() == [0] + [3] * 7
    before = vq.embedding.weight.detach().clone()
    out = vq(data)  # the restart happens at the start of this training step
    after = vq.embedding.weight.detach()
    assert torch.equal(after[0], before[0])
    assert (after[1:] - before[1:]).abs().amax(dim=1).min() > 50  # all 7 moved
    rows = data.reshape(-1, 2)
    for k in range(1, 8):  # each restarted code is one of the batch's encoder outputs
        assert (rows - after[k]).abs().amax(dim=1).min() == 0
    assert len(out.codes.unique()) > 1  # revived codes are used right away
    assert float(out.metrics["usage"]) > 1 / 8


def test_dead_code_restart_is_deterministic_and_resumable() -> None:
    def run(vq: VectorQuantizer, batches: list[torch.Tensor]) -> None:
        for b in batches:
            vq(b)

    torch.manual_seed(1)
    batches = [torch.randn(2, 6, 4) for _ in range(8)]
    torch.manual_seed(2)
    a = VectorQuantizer(num_codes=32, code_dim=4, dead_code_steps=2).train()
    run(a, batches[:4])
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert "unused_steps" in state and int(state["unused_steps"].max()) > 0
    b = VectorQuantizer(num_codes=32, code_dim=4, dead_code_steps=2).train()
    b.load_state_dict(state)
    torch.manual_seed(3)
    run(a, batches[4:])
    torch.manual_seed(3)
    run(b, batches[4:])
    assert torch.equal(a.embedding.weight, b.embedding.weight)
    assert torch.equal(a.unused_steps, b.unused_steps)


def test_eval_mode_does_not_touch_state() -> None:
    vq = VectorQuantizer(num_codes=8, code_dim=2, dead_code_steps=1).eval()
    w = vq.embedding.weight.detach().clone()
    vq(torch.randn(1, 4, 2))
    vq(torch.randn(1, 4, 2))
    assert torch.equal(vq.unused_steps, torch.zeros(8, dtype=torch.int64))
    assert torch.equal(vq.embedding.weight, w)


def test_kl_matches_closed_form() -> None:
    g = DiagonalGaussian(latent_dim=2)
    mean = torch.tensor([[[0.5, -1.0]], [[0.0, 2.0]]])  # (B=2, N=1, d=2)
    logvar = torch.tensor([[[0.0, math.log(4.0)]], [[math.log(0.25), 0.0]]])
    out = g(torch.cat([mean, logvar], -1))
    # KL(N(m, s^2) || N(0,1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed per image, averaged over the batch
    kl1 = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1 + 4 - 1 - math.log(4))
    kl2 = 0.5 * (0 + 0.25 - 1 - math.log(0.25)) + 0.5 * (4 + 1 - 1 - 0)
    assert math.isclose(float(out.losses["kl"].detach()), (kl1 + kl2) / 2, rel_tol=1e-6)
    # training samples, eval returns the mean
    assert not torch.equal(out.latents, mean)
    g.eval()
    assert torch.equal(g(torch.cat([mean, logvar], -1)).latents, mean)


def test_kl_sample_statistics_and_gradients() -> None:
    torch.manual_seed(0)
    g = DiagonalGaussian(latent_dim=1)
    params = torch.tensor([[[1.0, math.log(0.09)]]]).expand(20000, 1, 2).clone().requires_grad_(True)
    out = g(params)
    s = out.latents.detach().flatten()
    assert abs(float(s.mean()) - 1.0) < 0.01 and abs(float(s.std()) - 0.3) < 0.01
    out.latents.sum().backward()
    assert params.grad is not None and torch.all(params.grad[..., 0] == 1)  # reparameterisation
    with pytest.raises(TextokError):
        g(torch.zeros(1, 1, 3))


def test_quantizer_config_and_builder() -> None:
    assert isinstance(build_quantizer(QuantizerConfig.preset("titok-vq")), VectorQuantizer)
    vq = build_quantizer(QuantizerConfig.preset("titok-vq"))
    assert vq.num_codes == 4096 and vq.code_dim == 12 and vq.l2_normalized and vq.beta == 0.25
    assert isinstance(build_quantizer(QuantizerConfig.preset("kl-8")), DiagonalGaussian)
    assert isinstance(build_quantizer(QuantizerConfig(kind="none")), torch.nn.Identity)
    with pytest.raises(ConfigError):
        QuantizerConfig(kind="fsq")
    cfg = QuantizerConfig().override(["num_codes=1024", "dead_code_steps=100"])
    assert QuantizerConfig.from_dict(cfg.to_dict()) == cfg


def _restart_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical initial codebooks, as after a seeded model build
        vq = VectorQuantizer(num_codes=32, code_dim=4, dead_code_steps=1).train()
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batch
        restarted = 0
        for _ in range(4):
            z = torch.randn(6, 3, 4, generator=g)
            restarted += int((vq.unused_steps >= 1).sum())
            vq(z)
        torch.save({"codebook": vq.embedding.weight.detach().clone(), "unused": vq.unused_steps.clone(),
                    "restarted": restarted}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_dead_code_restarts_keep_codebooks_identical_across_ranks(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_restart_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["restarted"] > 0  # restarts happened, from different local batches
    assert torch.equal(a["unused"], b["unused"])
    assert torch.equal(a["codebook"], b["codebook"])
