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


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
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


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
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


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_straight_through_gradient_is_identity() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=4, l2_normalized=False)
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert torch.allclose(out.quantized, vq.codebook()[out.codes])


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_straight_through_with_l2_is_the_normalisation_jacobian() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=4, l2_normalized=True)
    z = torch.randn(2, 5, 4, requires_grad=True)
    upstream = torch.randn_like(z)
    (vq(z).quantized * upstream).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * upstream).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
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


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
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


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
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


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_eval_mode_does_not_touch_state() -> None:
    vq = VectorQuantizer(num_codes=8, code_dim=2, dead_code_steps=1).eval()
    w = vq.embedding.weight.detach().clone()
    vq(torch.randn(1, 4, 2))
    vq(torch.randn(1, 4, 2))
    assert torch.equal(vq.unused_steps, torch.zeros(8, dtype=torch.int64))
    assert torch.equal(vq.embedding.weight, w)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
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


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
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


# ---- ImageFolder's multi-scale residual and product quantizers ---------------------------------------------
from textok.models.multiscale import (  # noqa: E402
    MultiScaleQuantizerConfig,
    MultiScaleResidualQuantizer,
    ProductQuantizer,
    phi_index,
)
from textok.models.quantizers import VQOutput  # noqa: E402

MS_SCALES = (1, 1, 2, 3, 4)  # a repeated scale, a non-divisor of K (3 of 4), K itself


def _msrq(seed: int = 0, **kw) -> MultiScaleResidualQuantizer:
    torch.manual_seed(seed)
    return MultiScaleResidualQuantizer(kw.pop("scales", MS_SCALES), kw.pop("num_codes", 16), kw.pop("code_dim", 3),
                                       **kw).double()


def _latents(b: int, k: int, c: int, seed: int = 0, branches: int = 1) -> torch.Tensor:
    return torch.randn(b, branches * k * k, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_multiscale_forward_equals_rebuild_from_codes() -> None:
    q = _msrq()
    z = _latents(5, 4, 3)
    out = q(z)
    assert isinstance(out, VQOutput) and out.codes.shape == (5, 1 + 1 + 4 + 9 + 16) and out.codes.dtype == torch.int64
    assert torch.allclose(out.quantized, q.decode_codes(out.codes), rtol=1e-12, atol=1e-12)
    # every prefix: the codes of the first n scales rebuild what forward gives when only n scales are kept
    for n in range(1, len(MS_SCALES) + 1):
        prefix = out.codes[:, :q.offsets[n]]
        kept = q(z, torch.full((5,), n)).quantized
        assert torch.allclose(kept, q.decode_codes(prefix), rtol=1e-12, atol=1e-12)
        assert torch.allclose(kept, q.decode_codes(out.codes, num_scales=n), rtol=1e-12, atol=1e-12)
    assert [m.shape[1:] for m in q.split_scales(out.codes)] == [(pn, pn) for pn in MS_SCALES]
    with pytest.raises(TextokError, match="prefix"):
        q.decode_codes(out.codes[:, :3])
    with pytest.raises(TextokError, match=r"\[0, 16\)"):
        q.decode_codes(out.codes + 16)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_matching_is_cosine_and_the_lookup_is_the_raw_code() -> None:
    q = _msrq(scales=(1,), num_codes=2, code_dim=2, phi_convs=0)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.1]]))  # raw norms differ from 1
    out = q(torch.tensor([[[0.1, 0.2]]], dtype=torch.float64))  # nearer code 0 in l2, code 1 in cosine
    assert out.codes.tolist() == [[1]]
    assert torch.allclose(out.quantized, torch.tensor([[[0.0, 0.1]]], dtype=torch.float64))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_teacher_forcing_inputs_are_area_downsampled_cumulative_fhat() -> None:
    q = _msrq()
    z = _latents(3, 4, 3, seed=1)
    codes = q(z).codes
    inputs = q.teacher_forcing_inputs(codes)
    assert inputs.shape == (3, q.offsets[-1] - 1, 3)
    for s in range(1, len(MS_SCALES)):
        fhat = q(z, torch.full((3,), s)).quantized.transpose(1, 2).reshape(3, 3, 4, 4)  # scales < s, via forward
        pn = MS_SCALES[s]
        want = F.interpolate(fhat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
        got = inputs[:, q.offsets[s] - 1:q.offsets[s + 1] - 1]
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), s


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_multiscale_straight_through_and_loss_gradients() -> None:
    q = _msrq()
    z = _latents(2, 4, 3, seed=2).requires_grad_(True)
    upstream = torch.randn_like(z)
    (q(z).quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # identity: value f_hat, gradient straight through
    assert q.embedding.weight.grad is None
    # the VQ loss: mean over scales of beta ||sg(f_hat_s) - f||^2 + ||f_hat_s - sg(f)||^2 on the cumulative f_hat
    z.grad = None
    out = q(z)
    cumulative = [q(z.detach(), torch.full((2,), n)).quantized for n in range(1, len(MS_SCALES) + 1)]
    mse = sum(float((c - z.detach()).square().mean()) for c in cumulative) / len(MS_SCALES)
    assert math.isclose(float(out.losses["commitment"].detach()), 0.25 * mse, rel_tol=1e-10)
    assert math.isclose(float(out.losses["codebook"].detach()), mse, rel_tol=1e-10)
    out.losses["codebook"].backward()
    assert z.grad is None or torch.all(z.grad == 0)  # the codebook term trains codes and phi only
    assert q.embedding.weight.grad.abs().sum() > 0 and all(p.conv.weight.grad is not None for p in q.phis)
    q.zero_grad()
    q(z).losses["commitment"].backward()
    assert z.grad.abs().sum() > 0 and (q.embedding.weight.grad is None or torch.all(q.embedding.weight.grad == 0))


def test_error_falls_scale_by_scale_on_a_fit_toy() -> None:
    """Fit codebook and phi to smooth toy maps; then every scale removes more of the residual."""
    torch.manual_seed(0)
    scales, K, C = (1, 2, 3, 4, 6), 6, 4
    q = MultiScaleResidualQuantizer(scales, 32, C, phi_convs=4)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, C, 2, 2, generator=g), 0.5 * torch.randn(64, C, 3, 3, generator=g)
    f = (F.interpolate(a, size=(K, K), mode="bilinear", align_corners=True)
         + F.interpolate(b, size=(K, K), mode="bilinear", align_corners=True))
    z = f.flatten(2).transpose(1, 2)

    def errors() -> list[float]:
        with torch.no_grad():
            return [float((q(z, torch.full((64,), n)).quantized - z).square().mean()) for n in range(1, 6)]

    before = errors()
    opt = torch.optim.Adam(q.parameters(), lr=5e-2)
    for _ in range(60):
        loss = q(z).losses["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = errors()
    assert all(e2 < 0.9 * e1 for e1, e2 in zip(after, after[1:])), after
    assert after[-1] < 0.05 * float(z.square().mean()) and after[-1] < 0.5 * before[-1], (before, after)


def test_phi_convs_follow_var_ticks() -> None:
    # VAR's 4 shared convs over the paper's 10 scales, ties as its numpy code breaks them
    assert [phi_index(s, 10, 4) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(s, 3, 3) for s in range(3)] == [0, 1, 2]
    q = _msrq(phi_ratio=0.0)
    assert len(q.phis) == 0  # ratio 0: phi is the identity, no convs
    q = _msrq(scales=(1, 2, 3), phi_convs=4)  # ticks 0, 1, 3: the unused tick gets no conv (no idle parameters)
    assert len(q.phis) == 3 and q._phi_of_scale == [0, 1, 2]


def _pq(branches: int = 2, **kw) -> ProductQuantizer:
    torch.manual_seed(0)
    cfg = MultiScaleQuantizerConfig(scales=MS_SCALES, branches=branches, num_codes=16, code_dim=3, **kw)
    return ProductQuantizer(cfg).double()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_product_quantizer_branch_depends_only_on_its_token_range() -> None:
    pq = _pq()
    z = _latents(2, 4, 3, seed=3, branches=2)
    out = pq(z)
    assert out.quantized.shape == (2, 16, 6) and out.codes.shape == (2, 2, pq.offsets[-1])
    z2 = z.clone()
    z2[:, :16] += torch.randn(2, 16, 3, dtype=torch.float64)  # only branch 0's tokens change
    out2 = pq(z2)
    assert torch.equal(out2.codes[:, 1], out.codes[:, 1]) and torch.equal(out2.quantized[..., 3:], out.quantized[..., 3:])
    assert not torch.equal(out2.codes[:, 0], out.codes[:, 0])
    zg = z.clone().requires_grad_(True)
    pq(zg).quantized[..., 3:].sum().backward()  # branch 1's channels
    assert torch.all(zg.grad[:, :16] == 0) and torch.all(zg.grad[:, 16:] != 0)
    # the branches' channels are concatenated: branch p = its own quantizer on its token range
    for p in range(2):
        own = pq.branches[p](z[:, 16 * p:16 * (p + 1)])
        assert torch.equal(out.codes[:, p], own.codes)
        assert torch.allclose(out.quantized[..., 3 * p:3 * (p + 1)], own.quantized, rtol=1e-12, atol=1e-12)
    assert torch.allclose(pq.decode_codes(out.codes), out.quantized, rtol=1e-12, atol=1e-12)
    assert [m.shape for m in pq.split_scales(out.codes)] == [(2, 2, pn, pn) for pn in MS_SCALES]


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_dropout_masks_exactly_the_chosen_rows_with_one_n_shared_by_the_branches() -> None:
    pq = _pq(dropout=0.5, dropout_start=2)
    B, S = 40, len(MS_SCALES)
    keep = pq.sample_dropout(B, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (B,) and keep.dtype == torch.int64
    assert set(keep.tolist()) <= set(range(2, S + 1)) and (keep < S).any() and (keep == S).any()
    z = _latents(B, 4, 3, seed=4, branches=2)
    full, dropped = pq(z), pq(z, keep)
    assert torch.equal(full.codes, dropped.codes)  # dropout changes f_hat, never the codes
    for r in range(B):
        n = int(keep[r])
        for p in range(2):  # one n per row for every branch: exactly the first n scales of its codes
            want = pq.branches[p].decode_codes(full.codes[r:r + 1, p], num_scales=n)
            assert torch.allclose(dropped.quantized[r:r + 1, :, 3 * p:3 * (p + 1)], want, rtol=1e-12, atol=1e-12)
        if n == S:
            assert torch.allclose(dropped.quantized[r], full.quantized[r], rtol=1e-12, atol=1e-12)
    assert torch.equal(_pq(dropout=0.0).sample_dropout(8), torch.full((8,), S))


def test_usage_is_reported_per_branch_and_scale() -> None:
    pq = _pq()
    out = pq(_latents(3, 4, 3, seed=5, branches=2))
    usage = out.metrics["usage_per_scale"]
    assert usage.shape == (2, len(MS_SCALES))
    for p in range(2):
        for s, maps in enumerate(pq.split_scales(out.codes)):
            assert float(usage[p, s]) == maps[:, p].unique().numel() / 16
    assert float(usage[0, 0]) <= 3 / 16  # a 1x1 scale can use at most one code per image


def test_multiscale_config_refuses_bad_schedules() -> None:
    with pytest.raises(ConfigError, match="non-decreasing"):
        MultiScaleQuantizerConfig(scales=(1, 3, 2))
    with pytest.raises(ConfigError, match="dropout_start"):
        MultiScaleQuantizerConfig(scales=(1, 2), dropout_start=3)
    cfg = MultiScaleQuantizerConfig().override(["scales=[1,2,4]", "phi_convs=3"])  # overrides as on the CLI
    assert cfg.scales == (1, 2, 4) and cfg.codes_per_branch == 21 and cfg.codes_per_image == 42
    assert MultiScaleQuantizerConfig.from_dict(cfg.to_dict()) == cfg
    assert MultiScaleQuantizerConfig().codes_per_branch == 286 and MultiScaleQuantizerConfig().codes_per_image == 572


def _usage_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pq = _pq().train()
        z = _latents(6, 4, 3, seed=0, branches=2)[3 * rank:3 * (rank + 1)]  # each rank: half of one batch
        torch.save(pq(z).metrics["usage_per_scale"], f"{out}/usage{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.slow
def test_usage_per_scale_is_of_the_global_batch_under_data_parallelism(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_usage_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    a, b = (torch.load(tmp_path / f"usage{r}.pt", weights_only=True) for r in (0, 1))
    whole = _pq()(_latents(6, 4, 3, seed=0, branches=2)).metrics["usage_per_scale"]
    assert torch.equal(a, b) and torch.equal(a, whole)
