"""VAR with folded product-quantized codes: paper size, sequence layout, block causality, KV-cached sampling
against a full forward, guidance, the loss, compatibility with the tokenizer, top-k / top-p."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from textok.errors import ConfigError, TextokError
from textok.models.imagefolder import ImageFolder, ImageFolderConfig
from textok.models.multiscale import MultiScaleQuantizerConfig, ProductQuantizer
from textok.models.var import VAR, VARConfig, sample_top_k_top_p

pytestmark = pytest.mark.usefixtures("one_thread")

SCALES = (1, 2, 2, 3)


def quantizer(seed: int = 0) -> ProductQuantizer:
    torch.manual_seed(seed)
    return ProductQuantizer(MultiScaleQuantizerConfig(scales=SCALES, branches=2, num_codes=12, code_dim=3)).double()


def model(fold: bool = True, seed: int = 0) -> VAR:
    """A float64 VAR whose weights are all random (VAR's init starts every block near the identity, which
    would hide a leak through attention)."""
    torch.manual_seed(seed)
    m = VAR(VARConfig(scales=SCALES, branches=2, codebook_size=12, code_dim=3, num_classes=5, width=16, depth=2,
                      heads=2, fold=fold, drop_path=0.0)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def random_codes(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 12, (b, 2, sum(pn * pn for pn in SCALES)), generator=torch.Generator().manual_seed(seed))


# ---- presets --------------------------------------------------------------------------------------------------
def test_paper_generator_size():
    cfg = VARConfig.preset("var-imagefolder-b-256")
    assert (cfg.depth, cfg.width, cfg.heads, cfg.branches, cfg.codebook_size, cfg.code_dim) == (17, 1088, 17, 2, 4096, 32)
    assert cfg.scales == (1, 1, 2, 3, 3, 4, 5, 6, 8, 11) and cfg.fold
    assert cfg.sequence_length == 286 and cfg.branches * cfg.codes_per_branch == 572
    with torch.device("meta"):
        m = VAR(cfg)
    blocks, total = m.num_block_params(), m.num_params()
    # qkv 3, proj 1, MLP 8, adaLN 6 (x D^2) + biases + the attention's per-head log-temperature
    assert blocks == 17 * (18 * 1088**2 + 15 * 1088 + 17)
    assert abs(blocks / 362e6 - 1) < 0.002  # the paper's "362M" is the transformer blocks
    assert 370e6 < total < 380e6  # + class table, positions, the 2 x 4096 head and its adaLN: 375.3M
    cfg.check_compatible(ImageFolderConfig.preset("imagefolder-b-256"))
    assert m.flops_per_forward() > 2 * 12 * 1088**2 * 17 * 286  # 12 D^2 multiply-adds per token and block


@pytest.mark.parametrize("res", [32, 64])
def test_cpu_presets_fit_their_tokenizers(res):
    VARConfig.preset(f"var-s-{res}").check_compatible(ImageFolderConfig.preset(f"imagefolder-s-{res}"))
    VARConfig.preset("var-tiny").check_compatible(ImageFolderConfig.preset("imagefolder-tiny"))


def test_mismatched_generator_is_refused_naming_both():
    tok = ImageFolderConfig.preset("imagefolder-tiny")
    for override in ("branches=1", "codebook_size=32", "scales=[1,3]", "code_dim=4"):
        cfg = VARConfig.preset("var-tiny").override([override])
        with pytest.raises(TextokError) as err:
            cfg.check_compatible(tok)
        msg = str(err.value)
        assert "generator models" in msg and "the tokenizer makes" in msg and "for_tokenizer" in msg
    assert VARConfig.for_tokenizer(tok, num_classes=3, width=32, depth=1, heads=2).scales == (1, 2, 3)
    with pytest.raises(ConfigError, match="divisible"):
        VARConfig(width=30, heads=4)
    cfg = VARConfig.preset("var-s-32").override(["fold=false", "scales=[1,2,3,4,6]"])
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict() and VARConfig.from_dict(cfg.to_dict()) == cfg


# ---- sequence layout and causality ----------------------------------------------------------------------------
def test_folded_length_is_the_sum_of_squares_and_unfolded_doubles_it():
    L = sum(pn * pn for pn in SCALES)
    q = quantizer()
    codes = random_codes(3)
    inputs = q.teacher_forcing_inputs(codes)
    assert inputs.shape == (3, L - 1, 6)
    for fold, length in ((True, L), (False, 2 * L)):
        m = model(fold)
        seen = []
        m.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
        logits = m(inputs, torch.tensor([0, 1, 2]))
        assert m.cfg.sequence_length == length and seen == [length] and m.mask.shape == (length, length)
        assert logits.shape == (3, 2, L, 12)  # the same (B, P, L, V) layout either way


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.parametrize("fold", [True, False])
def test_logits_of_a_scale_ignore_the_codes_of_later_scales(fold):
    m, q = model(fold), quantizer()
    offsets = q.offsets
    labels = torch.tensor([1, 4])
    codes = random_codes(2)
    base = m(q.teacher_forcing_inputs(codes), labels)
    for s in range(len(SCALES) - 1):
        changed = codes.clone()
        changed[:, :, offsets[s + 1]:] = random_codes(2, seed=s + 7)[:, :, offsets[s + 1]:]  # scales > s
        out = m(q.teacher_forcing_inputs(changed), labels)
        # scale s + 1 reads f_hat of scales <= s only, so it is unchanged too
        upto = offsets[min(s + 2, len(SCALES))]
        assert torch.allclose(out[:, :, :upto], base[:, :, :upto], rtol=1e-10, atol=1e-12), s
        if s + 2 < len(SCALES):
            assert not torch.allclose(out[:, :, upto:], base[:, :, upto:])


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.parametrize("fold", [True, False])
def test_kv_cached_sampling_equals_a_full_forward_on_the_sampled_codes(fold):
    m, q = model(fold), quantizer()
    labels = torch.tensor([0, 3, 4])
    codes, logits = m.generate(labels, q, cfg=1.5, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(0),
                               return_logits=True)
    assert codes.shape == (3, 2, q.offsets[-1]) and int(codes.max()) < 12
    full = m.guided_logits(q.teacher_forcing_inputs(codes), labels, 1.5)
    for s in range(len(SCALES)):
        a, b = q.offsets[s], q.offsets[s + 1]
        assert torch.allclose(logits[s], full[:, :, a:b], rtol=1e-9, atol=1e-10), s
    greedy = m.generate(labels, q, cfg=1.5, temperature=0)
    assert torch.equal(greedy, m.guided_logits(q.teacher_forcing_inputs(greedy), labels, 1.5).argmax(-1))


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_cfg_zero_is_the_conditional_model_and_the_ramp_grows_over_scales():
    m, q = model(), quantizer()
    labels = torch.tensor([2, 1])
    codes, logits = m.generate(labels, q, cfg=0.0, generator=torch.Generator().manual_seed(1), return_logits=True)
    inputs = q.teacher_forcing_inputs(codes)
    cond = m(inputs, labels, drop=torch.zeros(2, dtype=torch.bool))
    assert torch.allclose(torch.cat(logits, dim=2), cond, rtol=1e-9, atol=1e-10)
    assert torch.allclose(m.guided_logits(inputs, labels, 0.0), cond, rtol=1e-9, atol=1e-10)
    uncond = m(inputs, torch.full_like(labels, 5))
    guided = m.guided_logits(inputs, labels, 2.0)
    for s in range(len(SCALES)):  # (1 + t) cond - t uncond with t = cfg * s / (S - 1)
        t = 2.0 * s / (len(SCALES) - 1)
        a, b = q.offsets[s], q.offsets[s + 1]
        assert torch.allclose(guided[:, :, a:b], (1 + t) * cond[:, :, a:b] - t * uncond[:, :, a:b], rtol=1e-9)


# ---- training -------------------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
@pytest.mark.parametrize("fold", [True, False])
def test_loss_is_the_mean_of_the_branch_cross_entropies(fold):
    m, q = model(fold), quantizer()
    codes, labels = random_codes(4), torch.tensor([0, 1, 2, 3])
    inputs = q.teacher_forcing_inputs(codes)
    out = m.training_loss(codes, inputs, labels)
    logits = m(inputs, labels)
    ce = [F.cross_entropy(logits[:, p].reshape(-1, 12), codes[:, p].reshape(-1)) for p in range(2)]
    assert torch.allclose(out["ce_per_branch"], torch.stack(ce), rtol=1e-10)
    assert math.isclose(float(out["loss"].detach()), float(sum(ce).detach() / 2), rel_tol=1e-10)
    m.train()
    m.cfg.class_dropout = 0.99  # in training, labels drop to the null class (for guidance)
    dropped = m.training_loss(codes, inputs, labels)["loss"]
    null = m.eval().training_loss(codes, inputs, torch.full((4,), 5))["loss"]
    assert math.isclose(float(dropped.detach()), float(null.detach()), rel_tol=1e-10)


def test_a_few_steps_fit_the_codes_of_a_tiny_tokenizer():
    torch.manual_seed(0)
    tok = ImageFolder(ImageFolderConfig.preset("imagefolder-tiny")).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = tok.encode_codes(x)
    inputs = tok.teacher_forcing_inputs(codes).detach()
    labels = torch.tensor([0, 1, 2, 3])
    for fold in (True, False):
        torch.manual_seed(0)
        var = VAR(VARConfig.for_tokenizer(tok.config, num_classes=4, width=32, depth=2, heads=2, fold=fold,
                                          class_dropout=0.0))
        var.check_compatible(tok.config)
        opt = torch.optim.AdamW(var.parameters(), lr=3e-3)
        first = None
        for _ in range(40):
            loss = var.training_loss(codes, inputs, labels)["loss"]
            first = first if first is not None else float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(loss.detach()) < 0.5 * first, (fold, first, float(loss.detach()))
        sampled = var.eval().generate(labels, tok.quantizer, cfg=1.0, top_k=5, top_p=0.95,
                                      generator=torch.Generator().manual_seed(0))
        assert sampled.shape == codes.shape and tok.decode_codes(sampled).shape == (4, 3, 16, 16)


def test_bad_inputs_are_clear_errors():
    m, q = model(), quantizer()
    codes = random_codes(2)
    inputs = q.teacher_forcing_inputs(codes)
    with pytest.raises(TextokError, match="teacher-forcing inputs"):
        m(inputs[:, 1:], torch.tensor([0, 1]))
    with pytest.raises(TextokError, match="class ids"):
        m(inputs, torch.tensor([0, 9]))
    with pytest.raises(TextokError, match="codes must have shape"):
        m.training_loss(codes[:, :1], inputs, torch.tensor([0, 1]))


# ---- sampling helpers -----------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_top_k_top_p_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).expand(2000, -1)
    assert torch.equal(sample_top_k_top_p(logits, temperature=0), torch.full((2000,), 1))
    assert torch.equal(sample_top_k_top_p(logits, top_k=1, generator=g), torch.full((2000,), 1))
    ids = sample_top_k_top_p(logits, top_k=2, generator=g)
    assert set(ids.tolist()) == {1, 3}
    p = logits[0].softmax(-1)  # sorted mass: 0.64, 0.87, ...: top_p 0.8 keeps ids 1 and 3
    assert float(p[1]) < 0.8 < float(p[1] + p[3])
    assert set(sample_top_k_top_p(logits, top_p=0.8, generator=g).tolist()) == {1, 3}
    assert set(sample_top_k_top_p(logits, top_p=0.1, generator=g).tolist()) == {1}
    assert set(sample_top_k_top_p(logits, generator=g).tolist()) == {0, 1, 2, 3, 4}


# ---- VAR's attention, stochastic depth, weight decay ----------------------------------------------------------
def test_attention_is_vars_attn_l2_norm():
    """q and k l2-normalised per head, q times exp(min(s_h, log 100)) with s_h learned from log 4, softmax scale 1
    (VAR's attn_l2_norm, in all three references); qk_norm (RMSNorm, 1/sqrt(d) kept) is another function."""
    from textok.models.var import CachedAttention

    torch.manual_seed(0)
    attn = CachedAttention(16, 2, l2_norm=True).double()
    assert torch.allclose(attn.log_scale, torch.full((2,), math.log(4.0), dtype=torch.float64))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))

    def reference(log_scale: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.qkv(x).view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        temp = log_scale.clamp(max=math.log(100)).exp()[None, :, None, None]
        logits = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)) * temp
        out = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return attn.proj(out.transpose(1, 2).reshape(3, 5, 16))

    assert torch.allclose(attn(x, mask), reference(attn.log_scale), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        attn.log_scale.copy_(torch.tensor([1.0, 9.0]))  # log 100 = 4.6: the second head is capped at 100
    assert torch.allclose(attn(x, mask), reference(torch.tensor([1.0, math.log(100)], dtype=torch.float64)),
                          rtol=1e-10, atol=1e-12)
    plain = CachedAttention(16, 2, qk_norm=True).double()
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "log_scale"}, strict=False)
    assert not torch.allclose(plain(x, mask), attn(x, mask), atol=1e-3)


def test_presets_use_vars_attention_and_stochastic_depth():
    for name in VARConfig.presets():
        cfg = VARConfig.preset(name)
        assert cfg.attn_l2_norm and not cfg.qk_norm, name
        assert math.isclose(cfg.drop_path_rate, 0.1 * cfg.depth / 24), name
    cfg = VARConfig.preset("var-s-32")
    m = VAR(cfg)
    rates = [b.drop_path for b in m.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.1 * 4 / 24)  # linear over the blocks, as VAR's
    assert all(b.attn.log_scale is not None for b in m.blocks)
    with pytest.raises(ConfigError, match="attn_l2_norm and qk_norm"):
        VARConfig(qk_norm=True)
    with pytest.raises(ConfigError, match="drop_path"):
        VARConfig(drop_path=1.5)


def test_stochastic_depth_drops_whole_samples_in_training_only():
    from textok.models.vit import drop_path

    x = torch.ones(4000, 3, 2, dtype=torch.float64)
    out = drop_path(x, 0.25, torch.Generator().manual_seed(0))
    kept = out[:, 0, 0] != 0
    assert torch.all(out[kept] == 1 / 0.75) and torch.all(out[~kept] == 0)  # per sample, rescaled
    assert abs(kept.double().mean().item() - 0.75) < 0.03
    torch.manual_seed(0)
    m = VAR(VARConfig(scales=SCALES, branches=2, codebook_size=12, code_dim=3, num_classes=5, width=16, depth=3,
                      heads=2, drop_path=0.5)).double()
    q, codes, labels = quantizer(), random_codes(8), torch.arange(8) % 5
    inputs = q.teacher_forcing_inputs(codes)
    keep = torch.zeros(8, dtype=torch.bool)
    m.train()
    a = m.training_loss(codes, inputs, labels, keep, torch.Generator().manual_seed(1))["loss"]
    b = m.training_loss(codes, inputs, labels, keep, torch.Generator().manual_seed(1))["loss"]
    c = m.training_loss(codes, inputs, labels, keep, torch.Generator().manual_seed(2))["loss"]
    assert a.item() == b.item() and a.item() != c.item()  # drawn from the step's generator
    m.eval()
    assert m.training_loss(codes, inputs, labels, keep)["loss"].item() == m.training_loss(codes, inputs, labels,
                                                                                          keep)["loss"].item()


def test_level_embedding_and_temperatures_are_not_weight_decayed():
    from textok.train.loop import param_groups

    m = VAR(VARConfig.preset("var-tiny"))
    decayed, free = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    free_names = {names[id(p)] for p in free["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert "level_embed.weight" in free_names and "pos_embed" in free_names and "pos_start" in free_names
    assert {f"blocks.{i}.attn.log_scale" for i in range(2)} <= free_names
    assert "class_embed.weight" in decayed_names and "blocks.0.attn.qkv.weight" in decayed_names  # as VAR's


def test_a_config_saved_before_vars_attention_keeps_plain_attention(tmp_path):
    torch.manual_seed(0)
    cfg = VARConfig.preset("var-tiny").override({"attn_l2_norm": False, "drop_path": 0.0})
    VAR(cfg).save_pretrained(tmp_path / "old")
    record = json.loads((tmp_path / "old/config.json").read_text())
    for key in ("attn_l2_norm", "drop_path"):
        del record["config"][key]
    (tmp_path / "old/config.json").write_text(json.dumps(record))
    (tmp_path / "old/SHA256SUMS").unlink(missing_ok=True)  # written before models carried checksums, too
    old = VAR.from_pretrained(tmp_path / "old")
    assert not old.cfg.attn_l2_norm and old.cfg.drop_path_rate == 0.0
