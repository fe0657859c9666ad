"""MaskGIT generator: schedule, guidance, masked loss, memorisation, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats

from numerics import assert_same_maths

from textok.errors import ConfigError, TextokError
from textok.models.maskgit import MaskGIT, MaskGITConfig, masked_counts
from textok.models.vit import ViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(n: int = 16, k: int = 32, c: int = 2, **kw) -> MaskGIT:
    torch.manual_seed(0)
    cfg = MaskGITConfig(num_tokens=n, codebook_size=k, num_classes=c,
                        transformer=ViTConfig(width=64, depth=2, heads=4), **kw)
    return MaskGIT(cfg)


# ---- schedule ---------------------------------------------------------------------------------------
def test_masked_counts_follow_cosine_formula():
    n, steps = 32, 8
    expected = [math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps)) for s in range(steps)]
    assert masked_counts(n, steps) == expected
    assert expected[-1] == 0 and all(a > b for a, b in zip([n] + expected, expected))
    arccos = [math.floor(n * math.acos((s + 1) / steps) / (math.pi / 2)) for s in range(steps)]
    assert masked_counts(n, steps, "arccos") == arccos


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_generate_follows_schedule_and_ends_unmasked():
    m = tiny(n=32, k=64, c=3).eval()
    seen: list[list[int]] = []
    handle = m.register_forward_pre_hook(lambda mod, args: seen.append((args[0] == m.mask_id).sum(1).tolist()))
    labels = torch.tensor([0, 1, 2, 1])
    out = m.generate(labels, steps=8, temperature=1.0, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    handle.remove()
    counts = masked_counts(32, 8, m.config.mask_schedule)
    # Input of step s holds the masked count left by step s-1 (all N at step 0), for every sample.
    assert seen == [[n] * 4 for n in [32] + counts[:-1]]
    assert out.shape == (4, 32) and out.dtype == torch.int64
    assert out.min() >= 0 and out.max() < 64
    again = m.generate(labels, steps=8, temperature=1.0, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_generate_with_more_steps_than_tokens_and_guidance_runs_in_range():
    m = tiny(n=4, k=8, c=2).eval()
    out = m.generate(torch.tensor([0, 1]), steps=6, guidance_scale=2.5, guidance_schedule="cosine",
                     temperature=2.0, temperature_schedule="cosine", generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, 4) and out.min() >= 0 and out.max() < 8


# ---- guidance ---------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_guidance_scale_one_is_conditional_and_batched_cfg_matches_separate_passes():
    m = tiny().eval().double()  # the batched cond + uncond forward (2B rows) is compared with separate passes
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 33, (3, 16), generator=g)  # includes [MASK] = 32
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        cond = m(ids, labels)
        uncond = m(ids, torch.full_like(labels, m.null_class))
        assert torch.equal(m.guided_logits(ids, labels, 1.0), cond.float())  # the same forward, same shapes
        guided = m.guided_logits(ids, labels, 3.0)
        assert_same_maths(guided, uncond + 3.0 * (cond - uncond), what="guided logits")
        assert_same_maths(m.guided_logits(ids, labels, 0.0), uncond.float(), what="scale 0 vs unconditional")
    assert not torch.allclose(cond, uncond)


# ---- training loss ----------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_loss_only_uses_masked_positions_when_unmasked_weight_is_zero():
    m = tiny(class_dropout=0.0, unmasked_loss_weight=0.0, label_smoothing=0.0)
    codes = torch.randint(0, 32, (6, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    captured = {}

    def keep(mod, args, out):
        out.retain_grad()
        captured["logits"] = out

    h = m.head.register_forward_hook(keep)
    out = m.training_loss(codes, labels, generator=torch.Generator().manual_seed(5))
    h.remove()
    out["loss"].backward()
    mask, logits = out["mask"], captured["logits"]
    grad_norm = logits.grad.abs().sum(-1)
    assert (grad_norm[~mask] == 0).all() and (grad_norm[mask] > 0).all()
    assert mask.any(1).all() and not mask.all()
    manual = torch.nn.functional.cross_entropy(logits[mask].float(), codes[mask])
    torch.testing.assert_close(out["loss"], manual)


def test_default_loss_is_titoks_weighted_smoothed_cross_entropy():
    """Masked positions weight 1, unmasked 0.1, label smoothing 0.1, normalised by the weights (TiTok's MLMLoss)."""
    m = tiny(class_dropout=0.0)
    assert (m.config.unmasked_loss_weight, m.config.label_smoothing, m.config.mask_schedule) == (0.1, 0.1, "arccos")
    codes = torch.randint(0, 32, (6, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    out = m.training_loss(codes, labels, generator=torch.Generator().manual_seed(5))
    inputs, mask, _ = m.mask_tokens(codes, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = m(inputs, labels).double()
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, codes[..., None]).squeeze(-1)
    ce = 0.9 * nll + 0.1 * (-logp.mean(-1))  # smoothing 0.1 spreads 0.1 of the target uniformly over the K codes
    w = mask.double() + 0.1 * (~mask).double()
    expected = (ce * w).sum() / w.sum()
    assert abs(float(out["loss"].detach()) - float(expected)) / float(expected) < 1e-5
    assert (~mask).any()  # the unmasked positions entered with weight 0.1


def test_confidence_ranks_raw_logits_not_log_probabilities():
    """Position 0: raw top logit 5 among many close rivals (low log-probability); position 1: raw top logit 3
    with no rival (log-probability ~0). TiTok keeps the higher raw logit, so position 1 is re-masked."""
    m = tiny(n=2, k=8, c=1).eval()
    logits = torch.full((1, 2, 8), -10.0)
    logits[0, 0] = 4.9
    logits[0, 0, 3] = 5.0
    logits[0, 1, 6] = 3.0
    m.guided_logits = lambda ids, labels, scale: logits.clone()  # the network is not the point here
    seen = []
    real = m.guided_logits

    def spy(ids, labels, scale):
        seen.append(ids.clone())
        return real(ids, labels, scale)

    m.guided_logits = spy
    assert masked_counts(2, 2, m.config.mask_schedule)[0] == 1
    out = m.generate(torch.tensor([0]), steps=2, temperature=0.0, choice_temperature=0.0)
    assert seen[1].tolist() == [[3, m.mask_id]]  # after step 0: position 0 kept (code 3), position 1 re-masked
    assert out.tolist() == [[3, 6]]
    lp = logits.log_softmax(-1)
    assert lp[0, 0, 3] < lp[0, 1, 6]  # a log-probability ranking would have re-masked position 0 instead


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_mask_ratio_distribution_and_counts():
    m = tiny(n=32, k=16, mask_schedule="cosine")
    codes = torch.zeros(20000, 32, dtype=torch.long)
    inputs, mask, ratio = m.mask_tokens(codes, torch.Generator().manual_seed(0))
    # r = cos(pi/2 u), u ~ U(0,1)  =>  P(r <= x) = 1 - (2/pi) arccos(x)
    ks = stats.kstest(ratio.numpy(), lambda x: 1 - 2 / math.pi * torch.acos(torch.as_tensor(x)).numpy())
    assert ks.pvalue > 1e-3
    expected = (ratio * 32).round().clamp(min=1).long()  # TiTok's count
    assert torch.equal(mask.sum(1), expected)
    assert torch.equal(inputs == m.mask_id, mask)
    # Positions are uniform: each is masked at about the mean rate.
    per_pos = mask.float().mean(0)
    assert (per_pos - per_pos.mean()).abs().max() < 0.03
    # arccos schedule: r = arccos(u)/(pi/2)  =>  P(r <= x) = 1 - cos(pi x / 2)
    m2 = tiny(n=32, k=16, mask_schedule="arccos")
    _, _, r2 = m2.mask_tokens(codes, torch.Generator().manual_seed(1))
    assert stats.kstest(r2.numpy(), lambda x: 1 - torch.cos(torch.as_tensor(x) * math.pi / 2).numpy()).pvalue > 1e-3


def test_label_dropout_uses_null_class_in_training_only():
    m = tiny(class_dropout=0.5)
    seen = []
    h = m.class_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    codes = torch.zeros(1000, 16, dtype=torch.long)
    labels = torch.zeros(1000, dtype=torch.long)
    with torch.no_grad():
        m.training_loss(codes, labels, generator=torch.Generator().manual_seed(0))
        m.eval()
        m.training_loss(codes, labels, generator=torch.Generator().manual_seed(0))
    h.remove()
    frac = (seen[0] == m.null_class).float().mean().item()
    assert 0.43 < frac < 0.57
    assert (seen[1] == 0).all()


# ---- memorisation -----------------------------------------------------------------------------------
def test_loss_falls_and_greedy_generation_reproduces_memorised_sequences():
    K, N = 32, 16
    # plain CE (the smoothed one cannot reach ~0); cosine unmasks one token at the first step, so greedy decoding
    # cannot start from two different memorised sequences at once (arccos unmasks two)
    m = tiny(n=N, k=K, c=2, label_smoothing=0.0, mask_schedule="cosine")
    g = torch.Generator().manual_seed(0)
    base = torch.stack([torch.randperm(K, generator=g)[:N] for _ in range(2)])
    # Two sequences per class that differ at every position.
    seqs = torch.stack([base[0], (base[0] + 1 + torch.randint(0, K - 1, (N,), generator=g)) % K,
                        base[1], (base[1] + 1 + torch.randint(0, K - 1, (N,), generator=g)) % K])
    cls = torch.tensor([0, 0, 1, 1])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(250):
        idx = torch.randint(0, 4, (48,), generator=g)
        out = m.training_loss(seqs[idx], cls[idx], generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    last = sum(losses[-20:]) / 20
    assert losses[0] > 3.0 and last < 0.6, (losses[0], last)  # starts near ln(32) = 3.47
    m.eval()
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    for kw in (dict(guidance_scale=1.0), dict(guidance_scale=3.0, guidance_schedule="linear")):
        gen = m.generate(labels, steps=8, temperature=0.0, choice_temperature=0.0, **kw)
        for i in range(len(labels)):
            assert (gen[i] == seqs[cls == labels[i]]).all(1).any(), (i, kw)


# ---- errors, presets, cost --------------------------------------------------------------------------
def test_bad_inputs_raise_one_line_errors():
    m = tiny()
    ok = torch.zeros(2, 16, dtype=torch.long)
    labels = torch.tensor([0, 1])
    for bad in (torch.full((2, 16), 32), torch.full((2, 16), -1)):
        with pytest.raises(TextokError, match=r"outside \[0, 32\)"):
            m.training_loss(bad, labels)
    with pytest.raises(TextokError, match="shape"):
        m.training_loss(torch.zeros(2, 8, dtype=torch.long), labels)
    with pytest.raises(TextokError, match="integer"):
        m.training_loss(ok.float(), labels)
    with pytest.raises(TextokError, match=r"class ids must lie in \[0, 2\)"):
        m.training_loss(ok, torch.tensor([0, 2]))
    with pytest.raises(TextokError, match=r"class ids"):
        m.generate(torch.tensor([-1]))
    with pytest.raises(TextokError, match="steps"):
        m.generate(labels, steps=0)
    with pytest.raises(TextokError, match="guidance_schedule"):
        m.generate(labels, guidance_schedule="exp")
    with pytest.raises(TextokError) as err:
        m.check_compatible(64, 4096)
    msg = str(err.value)
    assert "64 tokens over 4096 codes" in msg and "16 tokens over 32 codes" in msg and "\n" not in msg
    m.check_compatible(16, 32)
    with pytest.raises(ConfigError):
        MaskGITConfig(mask_schedule="linear")


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_presets_parameter_count_and_flops():
    assert {"maskgit-tiny", "maskgit-b"} <= set(MaskGITConfig.presets())
    cfg = MaskGITConfig.preset("maskgit-b")
    with torch.device("meta"):
        m = MaskGIT(cfg)
    D, L, K, C, N = 768, 24, 4096, 1000, 32
    per_layer = 12 * D * D + 13 * D  # qkv + proj + MLP(4D) weights/biases + two LayerNorms
    expected = L * per_layer + 2 * D + (K + 1) * D + (C + 1) * D + (N + 1) * D + D * K + K
    assert sum(p.numel() for p in m.parameters()) == expected
    assert 170e6 < expected < 185e6  # TiTok's generator is ~177M
    mac = L * ((N + 1) * 12 * D * D + 2 * (N + 1) ** 2 * D) + N * D * K
    assert m.flops_per_forward() == pytest.approx(2 * mac)
    round_trip = MaskGITConfig.from_dict(cfg.override(["transformer.depth=2", "num_tokens=64"]).to_dict())
    assert round_trip.transformer.depth == 2 and round_trip.num_tokens == 64
    tiny_model = MaskGIT(MaskGITConfig.preset("maskgit-tiny"))
    logits = tiny_model(torch.zeros(2, 32, dtype=torch.long), torch.tensor([0, 10]))
    assert logits.shape == (2, 32, 256)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_maskgit_runs_start_from_titoks_optimiser() -> None:
    from textok.train.config import kind_optim, load_generator_config

    titok = kind_optim("maskgit")
    assert (titok.lr, titok.betas, titok.weight_decay, titok.warmup_steps) == (2e-4, (0.9, 0.96), 0.03, 10_000)
    assert titok.lr * titok.min_lr_ratio == pytest.approx(1e-5)
    assert load_generator_config("maskgit-tiny").optim == titok
    assert load_generator_config(None, kind="maskgit").optim == titok
    tuned = load_generator_config("maskgit-tiny", ["optim.lr=1e-3"]).optim
    assert tuned.lr == 1e-3 and tuned.betas == titok.betas  # an override changes only what it names
    assert load_generator_config("dit-tiny").optim.betas == (0.9, 0.999)  # DiT keeps DiT's


# ---- TiTok's sampler: annealing, power-cosine guidance, per-model defaults -----------------------------
def titok_reference_sample(m: MaskGIT, labels: torch.Tensor, steps: int, temperature: float, w: float,
                           decay: str, power: float, noise) -> torch.Tensor:
    """1d-tokenizer's MaskGIT sampling loop with softmax-temperature annealing (its FID sampler), restated
    from its description: guidance cond + w (cond - uncond) (constant / linear) or uncond + w' (cond - uncond)
    with power-cosine w'; logits / (0.5 + 0.8 (1 - r)); Gumbel noise at temperature T (1 - r) for the pick and
    the confidence; re-mask the floor(N arccos(r) / (pi/2)) least confident (at least 1, fewer than masked)."""
    N, mask_id = m.config.num_tokens, m.mask_id
    ids = torch.full((labels.shape[0], N), mask_id, dtype=torch.long)
    null = torch.full_like(labels, m.null_class)
    cfg = 0.0 if decay != "constant" else w
    for step in range(steps):
        r = (step + 1) / steps
        temp = temperature * (1 - r)
        is_mask = ids == mask_id
        cond, uncond = m(ids, labels).double(), m(ids, null).double()
        if decay == "power-cosine":
            cfg = (w - 1) * (1 - math.cos((step / steps) ** power * math.pi)) / 2 + 1
            logits = uncond + (cond - uncond) * cfg
        else:
            logits = cond + (cond - uncond) * cfg
        logits = logits / (0.5 + 0.8 * (1 - r))
        sampled = (logits + temp * noise(logits.shape).double()).argmax(-1)
        picked = logits.gather(-1, sampled[..., None]).squeeze(-1)
        sampled = torch.where(is_mask, sampled, ids)
        picked = torch.where(is_mask, picked, torch.full_like(picked, math.inf))
        mask_len = max(1, min(int(is_mask.sum(1).min()) - 1, math.floor(N * math.acos(r) / (math.pi / 2))))
        confidence = picked + temp * noise(picked.shape).double()
        cut = confidence.sort(dim=-1).values[:, mask_len - 1:mask_len]
        ids = sampled if step == steps - 1 else torch.where(confidence <= cut, mask_id, sampled)
        if decay == "linear":
            cfg = r * w
    return ids


def _shared_noise(monkeypatch, seed: int):
    """The same Gumbel draws, in call order, for textok's sampler and the reference loop."""
    import textok.models.maskgit as maskgit_module

    def source():
        g = torch.Generator().manual_seed(seed)

        def draw(shape, *args, **kwargs):
            u = torch.rand(shape, generator=g, dtype=torch.float64)
            return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return draw

    monkeypatch.setattr(maskgit_module, "_gumbel", source())
    return source()


@pytest.mark.parametrize("preset, ref", [
    ("maskgit-b", dict(steps=8, temperature=9.5, w=4.5, decay="linear", power=3.0)),     # TiTok-L-32
    ("maskgit-b-64", dict(steps=8, temperature=11.0, w=3.0, decay="linear", power=3.0)),  # TiTok-B-64
    ("maskgit-b-128", dict(steps=64, temperature=2.8, w=6.9, decay="power-cosine", power=3.0)),  # TiTok-S-128
])
def test_stored_sampler_reproduces_titoks_fid_sampler(preset, ref, monkeypatch):
    """Each preset stores TiTok's sampler for that model (1d-tokenizer's inference configs with its FID script's
    softmax-temperature annealing); generate() with no options follows it token for token."""
    sampler = MaskGITConfig.preset(preset).sampler
    n = 128 if preset == "maskgit-b-128" else 32
    torch.manual_seed(0)
    m = MaskGIT(MaskGITConfig(num_tokens=n, codebook_size=48, num_classes=3, sampler=sampler,
                              transformer=ViTConfig(width=32, depth=1, heads=2))).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)  # sharp, label-dependent logits, so guidance and annealing change the picks
    labels = torch.tensor([0, 1, 2, 1])
    reference_noise = _shared_noise(monkeypatch, seed=7)
    with torch.no_grad():
        got = m.generate(labels)
        want = titok_reference_sample(m, labels, noise=reference_noise, **ref)
    assert torch.equal(got, want)
    _shared_noise(monkeypatch, seed=7)
    with torch.no_grad():
        plain = m.generate(labels, softmax_annealing=False)
    assert not torch.equal(plain, got)  # annealing changes what is sampled


def test_power_cosine_guidance_ramp_and_exponent():
    from textok.models.maskgit import guidance_at

    for g in (0.0, 0.125, 0.5, 0.875):
        assert math.isclose(guidance_at("power-cosine", 6.9, g, 3.0), 1 + 5.9 * (1 - math.cos(math.pi * g**3)) / 2)
        assert math.isclose(guidance_at("cosine", 6.9, g), guidance_at("power-cosine", 6.9, g, 1.0))
        assert math.isclose(guidance_at("linear", 4.0, g), 1 + 3.0 * g)
    assert guidance_at("power-cosine", 6.9, 0.5, 3.0) < guidance_at("power-cosine", 6.9, 0.5, 1.0)
    with pytest.raises(ConfigError, match="guidance_exponent"):
        MaskGITConfig().override(["sampler.guidance_exponent=3"])  # with the linear schedule it would do nothing
    with pytest.raises(TextokError, match="guidance_exponent"):
        tiny().generate(torch.tensor([0]), guidance_schedule="linear", guidance_exponent=2.0)


def test_sampler_is_saved_with_the_model_and_generate_uses_it(tmp_path):
    cfg = MaskGITConfig(num_tokens=8, codebook_size=32, num_classes=2, transformer=ViTConfig(width=32, depth=1, heads=2))
    cfg = cfg.override(["sampler.steps=5", "sampler.guidance_scale=2.0", "sampler.guidance_schedule=constant"])
    torch.manual_seed(0)
    MaskGIT(cfg).save_pretrained(tmp_path / "g")
    m = MaskGIT.from_pretrained(tmp_path / "g").eval()
    assert m.config.sampler == cfg.sampler and m.config.sampler.softmax_annealing
    batches: list[int] = []
    handle = m.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    m.generate(torch.tensor([0, 1, 1]))
    handle.remove()
    assert batches == [6] * 5  # 5 stored steps, each guided (cond + uncond in one batch)
    # a model saved before samplers were stored keeps the sampler it was drawn with (no softmax annealing)
    record = json.loads((tmp_path / "g/config.json").read_text())
    del record["config"]["sampler"]
    (tmp_path / "g/config.json").write_text(json.dumps(record))
    (tmp_path / "g/SHA256SUMS").unlink(missing_ok=True)  # written before models carried checksums, too
    old = MaskGIT.from_pretrained(tmp_path / "g")
    assert not old.config.sampler.softmax_annealing and old.config.sampler.steps == 8
