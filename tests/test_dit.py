"""DiT over 1D tokens: shapes, sizes against the DiT paper, adaLN-zero, guidance and text conditioning."""

from __future__ import annotations

import pytest
import torch

from numerics import assert_same_maths, rounding_tolerance

from textok.errors import ConfigError
from textok.models.dit import DiT, DiTConfig


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter so zero-initialised layers (adaLN-zero, output) stop hiding the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(cfg: DiTConfig, B: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.num_tokens, cfg.in_channels, generator=g), torch.randint(0, 1000, (B,), generator=g)


def test_presets_and_output_shapes() -> None:
    assert {"dit-s", "dit-b", "dit-l", "dit-xl", "dit-tiny"} <= set(DiTConfig.presets())
    cfg = DiTConfig.preset("dit-tiny")
    x, t = _inputs(cfg)
    y = torch.tensor([0, 3, 9])
    model = DiT(cfg).eval()
    assert model(x, t, y).shape == (3, cfg.num_tokens, 2 * cfg.in_channels)  # ε and v
    plain = DiT(cfg.override(["learn_sigma=false"])).eval()
    assert plain(x, t, y).shape == x.shape
    assert plain.forward_with_cfg(x, t, y, cfg_scale=4.0).shape == x.shape
    # bf16 weights accept the float32 state a sampler keeps.
    assert plain.to(torch.bfloat16)(x, t, y).dtype == torch.bfloat16


# DiT paper, Table 1 (patch 2 at 256 px = 256 tokens): parameters (M) and Gflops (multiply-adds).
PAPER = {"dit-s": (33, 6.06), "dit-b": (130, 23.01), "dit-l": (458, 80.71), "dit-xl": (675, 118.64)}


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.parametrize("name", sorted(PAPER))
def test_sizes_match_dit_paper(name: str) -> None:
    params_m, gmacs = PAPER[name]
    cfg = DiTConfig.preset(name).override({"num_tokens": 256})
    with torch.device("meta"):
        model = DiT(cfg)
    assert model.num_params() / 1e6 == pytest.approx(params_m, rel=0.03)
    # flops_per_forward counts 2 × multiply-adds; the paper's "Gflops" are multiply-adds.
    assert model.flops_per_forward() / 2e9 == pytest.approx(gmacs, rel=0.01)
    assert model.flops_per_forward(batch=4) == pytest.approx(4 * model.flops_per_forward())
    ips = 1000.0
    assert model.estimate_mfu(ips, training=True) == pytest.approx(3 * model.estimate_mfu(ips))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_adaln_zero_blocks_are_identity_at_init() -> None:
    cfg = DiTConfig.preset("dit-tiny").override({"text_dim": 24})
    model = DiT(cfg).eval()
    x, t = _inputs(cfg)
    y = torch.tensor([1, 2, 3])
    text = torch.randn(3, 5, 24)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out))) for b in model.blocks]
    out = model(x, t, y, text)
    for h in hooks:
        h.remove()
    assert len(seen) == cfg.depth
    for inp, block_out in seen:
        assert inp.abs().sum() > 0
        torch.testing.assert_close(block_out, inp, rtol=0, atol=0)
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_guidance_scale_one_is_conditional_and_all_channels_are_guided() -> None:
    # float64: forward_with_cfg runs cond and uncond as one batch of 2B, compared here with separate batches of B
    cfg = DiTConfig.preset("dit-tiny")
    model = DiT(cfg).eval().double()
    _randomise(model)
    x, t = _inputs(cfg)
    x = x.double()
    y = torch.tensor([0, 5, 7])
    cond = model(x, t, y)
    uncond = model(x, t, None)  # y=None -> the null class
    assert (cond - uncond).abs().max() > rounding_tolerance(x.dtype) * cond.abs().max()
    assert_same_maths(model.forward_with_cfg(x, t, y, cfg_scale=1.0), cond, what="scale 1 vs conditional")
    s, C = 3.0, cfg.in_channels
    guided = model.forward_with_cfg(x, t, y, cfg_scale=s)
    expected_eps = uncond[..., :C] + s * (cond[..., :C] - uncond[..., :C])
    assert_same_maths(guided[..., :C], expected_eps, what="guided eps")  # every channel, not 3
    assert_same_maths(guided[..., C:], cond[..., C:], what="sigma")  # σ from the cond half


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_text_padding_does_not_change_the_output() -> None:
    # float64: the padded, trimmed and text-free forwards attend over keys of different lengths
    cfg = DiTConfig.preset("dit-tiny").override({"num_classes": 0, "text_dim": 32})
    model = DiT(cfg).eval().double()
    _randomise(model, seed=1)
    x, t = _inputs(cfg, B=2)
    x = x.double()
    text = torch.randn(2, 6, 32, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = model(x, t, text=text, text_mask=mask)
    garbage = torch.where(mask[..., None], text, torch.randn_like(text) * 100)
    assert_same_maths(model(x, t, text=garbage, text_mask=mask), out, what="garbage in padding")
    # Trimming the padding away gives the same result for the first row too.
    assert_same_maths(model(x[:1], t[:1], text=text[:1, :3]), out[:1], what="trimmed")
    # ... while a real token does matter.
    changed = text.clone()
    changed[:, 0] += 1.0
    assert (model(x, t, text=changed, text_mask=mask) - out).abs().max() > rounding_tolerance(x.dtype) * out.abs().max()
    # A caption with no real tokens reads the null text, like text=None.
    empty = torch.zeros_like(mask)
    assert_same_maths(model(x, t, text=text, text_mask=empty), model(x, t), what="empty caption vs no text")


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_text_cfg_uses_null_text_in_one_batch() -> None:
    cfg = DiTConfig.preset("dit-tiny-t2i").override({"text_dim": 16})
    model = DiT(cfg).eval().double()
    _randomise(model, seed=2)
    x, t = _inputs(cfg, B=2)
    x = x.double()
    text, mask = torch.randn(2, 4, 16, dtype=torch.float64), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    calls: list[int] = []
    h = model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    guided = model.forward_with_cfg(x, t, cfg_scale=2.5, text=text, text_mask=mask)
    h.remove()
    assert calls == [2 * x.shape[0]]  # cond + uncond in a single forward pass
    cond, uncond = model(x, t, text=text, text_mask=mask), model(x, t)
    C = cfg.in_channels
    assert_same_maths(guided[..., :C], uncond[..., :C] + 2.5 * (cond[..., :C] - uncond[..., :C]), what="guided eps")


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_label_dropout_only_while_training() -> None:
    cfg = DiTConfig.preset("dit-tiny").override({"class_dropout": 0.5})
    model = DiT(cfg).double()
    _randomise(model, seed=3)
    B = 64
    x, t = _inputs(cfg, B=B)
    x = x.double()
    y = torch.full((B,), 4)
    model.eval()
    cond, null = model(x, t, y), model(x, t, None)
    model.train()
    torch.manual_seed(0)
    out = model(x, t, y)
    tol = rounding_tolerance(x.dtype) * out.abs().max()
    is_null = (out - null).flatten(1).abs().amax(1) <= tol
    is_cond = (out - cond).flatten(1).abs().amax(1) <= tol
    assert bool((is_null | is_cond).all()) and not bool((is_null & is_cond).any())
    # about half of the rows are dropped: 0.5 +- 4 standard deviations of a Binomial(B, 0.5)
    assert abs(int(is_null.sum()) - B / 2) < 4 * (B / 4) ** 0.5


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        DiTConfig(width=100, heads=3)
    cfg = DiTConfig.preset("dit-tiny")
    model = DiT(cfg)
    with pytest.raises(ConfigError, match="expects latents"):
        model(torch.randn(1, cfg.num_tokens + 1, cfg.in_channels), torch.zeros(1))
    with pytest.raises(ConfigError, match="text_dim=0"):
        model(torch.randn(1, cfg.num_tokens, cfg.in_channels), torch.zeros(1), text=torch.randn(1, 2, 8))
