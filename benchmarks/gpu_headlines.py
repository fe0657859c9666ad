"""Phase d of the GPU suite: the seeds' speed headlines side by side, on one card, at one batch.

Samples per second, end to end (the generator's whole sampling loop, then the tokenizer's decoding to pixels),
random weights under bf16 autocast, eager (no compile: the same treatment on both sides), class-conditional with
classifier-free guidance (the guided batch is twice the batch, as the papers sample):

* ``titok_maskgit``: MaskGIT (maskgit-b, TiTok's generator) over 32 TiTok codes, 8 steps, then TiTok-L-32's
  decoder. TiTok reports **74×** the samples/s of DiT-XL/2 at 256 px with 250 DDPM steps.
* ``textok_dit_256``: DiT-XL over 32 TexTok tokens (8 channels), 250 DDPM steps, then TexTok-B-256-32's decoder
  (with 32 caption tokens).
* ``dit_xl2_256``: the reference. DiT-XL/2 at 256 px is a DiT-XL over the 32x32x4 SD-VAE latent in 2x2
  patches: 256 tokens of 16 channels. textok's DiT over 256 tokens of 16 channels has the same matmuls (its
  linear patch embedding of 16 inputs is DiT-XL/2's 2x2x4 convolution; the same 28 blocks of width 1152;
  the same 2 x 16 output channels with learned sigma), so it is FLOP-matched. The SD-VAE decoder is
  **excluded** (its weights are not here): the reference is timed faster than it is, so the ratios are
  lower bounds.
* ``textok_dit_512`` vs ``dit_xl2_512`` (1024 tokens): TexTok reports **93.5×** at 512 px.
* ``var_imagefolder``: VAR (var-imagefolder-b-256, depth 17) over ImageFolder's 10 scales of 2 branches, then
  ImageFolder-B-256's decoder (no paper figure against DiT).

250 DDPM steps cost 250 times one step: a DiT row times a run of ``dit_steps_timed`` steps of the same sampler
and scales it (``seconds = sampler(k steps) * 250 / k + decode``), which the row records.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

PAPER = {"titok_maskgit": ("dit_xl2_256", 74.0), "textok_dit_256": ("dit_xl2_256", None),
         "var_imagefolder": ("dit_xl2_256", None), "textok_dit_512": ("dit_xl2_512", 93.5)}


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    fn()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeats


def amp(device: torch.device):
    """bf16 autocast on a GPU (float32 weights: every model's own dtype handling stays as in training)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _labels(batch: int, classes: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device) % classes


def dit_row(preset: str, tokens: int, channels: int, tokenizer: Any | None, batch: int, steps: int, timed: int,
            cfg: float, device: torch.device) -> dict[str, Any]:
    """A DiT's DDPM sampling (``timed`` steps, scaled to ``steps``) + the tokenizer's decoding of its tokens."""
    from textok.diffusion import create_diffusion
    from textok.models.dit import DiT, DiTConfig
    from textok.text.embeddings import TextEmbeddings

    torch.manual_seed(0)
    cfg_ = DiTConfig.preset(preset).override({"num_tokens": tokens, "in_channels": channels})
    with device:  # built where it runs (a DiT-XL initialised on the host would take seconds)
        model = DiT(cfg_).eval()
    diffusion = create_diffusion("dit")
    y = _labels(batch, cfg_.num_classes, device)

    def sample() -> torch.Tensor:
        with torch.inference_mode(), amp(device):
            return diffusion.sample(model, (batch, tokens, channels), steps=timed, sampler="ddpm", cfg_scale=cfg,
                                    model_kwargs={"y": y}, device=device)

    sampler_s = _seconds(sample, device) * steps / timed
    decode_s = 0.0
    if tokenizer is not None:
        z = torch.randn(batch, tokens, channels, device=device)
        L = 32
        text = (TextEmbeddings(torch.randn(batch, L, tokenizer.config.text_dim), torch.ones(batch, L)).to(device)
                if tokenizer.config.text_in_decoder else None)

        def decode() -> None:
            with torch.inference_mode(), amp(device):
                tokenizer.decoder(z, text)

        decode_s = _seconds(decode, device)
    total = sampler_s + decode_s
    return {"samples_per_s": batch / total, "sampler_s": sampler_s, "decode_s": decode_s, "steps": steps,
            "reference": tokenizer is None,
            "steps_timed": timed, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def maskgit_row(preset: str, tokenizer: Any, batch: int, steps: int, cfg: float, device: torch.device
                ) -> dict[str, Any]:
    from textok.models.maskgit import MaskGIT, MaskGITConfig

    torch.manual_seed(0)
    c = MaskGITConfig.preset(preset).override({"num_tokens": tokenizer.config.num_tokens,
                                               "codebook_size": tokenizer.config.quantizer.num_codes})
    with device:
        model = MaskGIT(c).eval()
    y = _labels(batch, c.num_classes, device)

    def run() -> None:
        with torch.inference_mode(), amp(device):
            codes = model.generate(y, steps, guidance_scale=cfg)
            tokenizer.decode_codes(codes)

    seconds = _seconds(run, device)
    return {"samples_per_s": batch / seconds, "seconds": seconds, "decode_s": None, "steps": steps,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def var_row(preset: str, tokenizer: Any, batch: int, cfg: float, device: torch.device) -> dict[str, Any]:
    from textok.models.var import VAR, VARConfig

    torch.manual_seed(0)
    with device:
        model = VAR(VARConfig.preset(preset)).eval()
    y = _labels(batch, model.cfg.num_classes, device)

    def run() -> None:
        with torch.inference_mode(), amp(device):
            codes = model.generate(y, tokenizer.quantizer, cfg=cfg, top_k=750 if model.cfg.codebook_size > 750 else 0,
                                   top_p=0.95)
            tokenizer.decode_codes(codes)

    seconds = _seconds(run, device)
    return {"samples_per_s": batch / seconds, "seconds": seconds, "decode_s": None, "steps": len(model.cfg.scales),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def phase_headlines(device: torch.device, budget: float, smoke: bool) -> dict[str, Any]:
    """Every row that fits ``budget`` (in the order below), then the ratios beside the papers' figures."""
    from textok.models.imagefolder import ImageFolder, ImageFolderConfig
    from textok.models.textok import TexTok, TexTokConfig
    from textok.models.titok import TiTok, TiTokConfig

    if smoke:
        batch, dit, timed, steps = 2, "dit-tiny", 2, 4
        titok, textok, textok512, folder, maskgit, var = ("titok-tiny", "textok-tiny", "textok-tiny", "imagefolder-tiny",
                                                         "maskgit-tiny", "var-tiny")
        big_tokens = (16, 16)
    else:
        batch, dit, timed, steps = 64, "dit-xl", 10, 250
        titok, textok, textok512, folder, maskgit, var = ("titok-l-32", "textok-b-256-32", "textok-b-512-32",
                                                         "imagefolder-b-256", "maskgit-b", "var-imagefolder-b-256")
        big_tokens = (256, 1024)

    def build(cls, config_cls, preset):
        torch.manual_seed(0)
        with device:
            return cls(config_cls.preset(preset)).eval()

    t_end = time.time() + budget
    rows: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("dit_xl2_256", lambda: dit_row(dit, big_tokens[0], 16, None, batch, steps, timed, 1.5, device)),
        ("titok_maskgit", lambda: maskgit_row(maskgit, build(TiTok, TiTokConfig, titok), batch, 8, 5.5, device)),
        ("textok_dit_256", lambda: dit_row(dit, 32 if not smoke else 4, 8 if not smoke else 4,
                                           build(TexTok, TexTokConfig, textok), batch, steps, timed, 1.5, device)),
        ("var_imagefolder", lambda: var_row(var, build(ImageFolder, ImageFolderConfig, folder), batch, 4.25, device)),
        ("dit_xl2_512", lambda: dit_row(dit, big_tokens[1], 16, None, batch, steps, max(2, timed // 5), 1.5, device)),
        ("textok_dit_512", lambda: dit_row(dit, 32 if not smoke else 4, 8 if not smoke else 4,
                                           build(TexTok, TexTokConfig, textok512), batch, steps, timed, 1.5, device)),
    ]
    not_run = []
    for name, run in plan:
        if time.time() > t_end:
            not_run.append(name)
            continue
        t0 = time.time()
        try:
            rows[name] = {**run(), "batch": batch, "wall_s": round(time.time() - t0, 1)}
        except Exception as err:  # noqa: BLE001 - reported; the next row still runs
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ratios = []
    for name, (ref, paper) in PAPER.items():
        if name in rows and ref in rows:
            ratios.append({"row": name, "against": ref,
                           "ratio": round(rows[name]["samples_per_s"] / rows[ref]["samples_per_s"], 2),
                           "paper": paper})
    return {"batch": batch, "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "rows": rows, "ratios": ratios,
            "not_run": not_run, "errors": errors}


def render(d: dict[str, Any]) -> list[str]:
    lines = [f"Batch {d['batch']}, {d['precision']}, eager; samples/s end to end (sampling + decoding; the SD-VAE "
             "decoder of the DiT-XL/2 reference excluded, so ratios are lower bounds).", "",
             "| row | samples/s | sampling s | decoding s | steps (timed) |", "|---|---|---|---|---|"]
    for name, r in d["rows"].items():
        sampler = r.get("sampler_s", r.get("seconds", 0.0))
        decode = ("in sampling" if r["decode_s"] is None else "excluded (SD-VAE)" if r.get("reference")
                  else f"{r['decode_s']:.3f}")
        lines.append(f"| {name} | {r['samples_per_s']:.2f} | {sampler:.3f} | {decode} | "
                     f"{r['steps']} ({r.get('steps_timed', r['steps'])}) |")
    lines += ["", "| ratio | measured | paper |", "|---|---|---|"]
    for q in d["ratios"]:
        lines.append(f"| {q['row']} / {q['against']} | {q['ratio']}× | {q['paper'] or '—'}"
                     f"{'×' if q['paper'] else ''} |")
    if d["not_run"]:
        lines.append(f"\nNot run (budget spent): {', '.join(d['not_run'])}.")
    lines += [f"- error in {k}: {v}" for k, v in d["errors"].items()]
    return lines + [""]
