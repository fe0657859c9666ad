"""Generation verbs: ``extract-latents`` (a data set through a tokenizer, once) and ``sample`` (a generator's
samples decoded by its tokenizer)."""

from __future__ import annotations

import argparse

from ..data.images import check_output_image
from ..errors import TextokError
from ..generate.latents import META as LATENTS_META, extract_latents, read_meta
from ..generate.sampling import NPZ_PRECISION, GenerationPipeline, sample_grid, write_npz_distributed
from ..io import check_output, check_output_file
from ..distributed import distributed_session


def extract_latents_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="a trained tokenizer directory (e.g. runs/demo/textok/final)")
    p.add_argument("--data", default="scenes",
                   help="'scenes' (embedded), an image folder / tar with captions, or a shard directory")
    p.add_argument("--split", default="train")
    p.add_argument("--num", type=int, default=0, help="images to encode (0 = the whole split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the scenes' generator seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="latents directory (shards, captions, meta, caption bank)")
    p.add_argument("--no-progress", action="store_true")


def cmd_extract_latents(args: argparse.Namespace) -> None:
    check_output(args.out, [("--tokenizer", args.tokenizer), ("--data", args.data)], kind="directory",
                 markers=(LATENTS_META,), what="latents directory")
    out = extract_latents(args.tokenizer, args.data, args.out, split=args.split, num=args.num,
                          batch_size=args.batch_size, seed=args.seed, device=args.device,
                          progress=not args.no_progress)
    meta = read_meta(out)
    shape = f"{meta['count']} x ({meta['num_tokens']}, {meta['channels']}) continuous tokens"
    if meta["discrete"]:
        shape = f"{meta['count']} x {tuple(meta['code_shape'])} codes over {meta['codebook_size']} entries"
        if meta.get("code_layout"):
            lay = meta["code_layout"]
            shape += f" ({lay['branches']} branch(es) x scales {lay['scales']})"
    print(f"wrote {shape}, {meta['num_classes']} classes, to {out}")


def sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", required=True, help="a train-generator run's final/ directory")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer directory (default: the one the latents were extracted with)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="classes", type=int, nargs="+", default=None, metavar="K",
                      help="class ids (one grid row each; default: every class)")
    cond.add_argument("--caption", dest="captions", nargs="+", default=None, metavar="TEXT",
                      help="prompts for a text-to-image generator (one grid row each)")
    p.add_argument("--n", type=int, default=16, help="samples per class / prompt in the grid")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 250 DDPM, 50 flow, a MaskGIT's stored sampler (TiTok: 8, 64 for "
                        "S-128); a VAR takes one per scale)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance w in uncond + w (cond - uncond), >= 1. Default: DiT 4.0 for the grid and 1.5 for "
                        "--npz (DiT's FID setting); MaskGIT: its stored sampler's (TiTok-L-32's 4.5 is w = 5.5 here); "
                        "VAR 4.25 at the last scale, ramped from 1 over the scales (the paper's cfg 3.25 is w = 4.25)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"), default=None,
                   help="DiT sampler (default: ddpm for diffusion, euler for flow)")
    p.add_argument("--out", default=None, help="grid PNG")
    p.add_argument("--npz", default=None, help="also write --num-samples samples as uint8 NHWC arr_0 (for `textok eval`)")
    # --num-samples, not --num, under torchrun: torchrun reads any abbreviation of its own --numa-binding
    p.add_argument("--num-samples", "--num", dest="num", type=int, default=50000, help="samples in the .npz")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each DiT sampling step from a CUDA graph (GPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="default: fp32 for --npz (FID samples, as DiT's FID sampler), auto for the grid (bf16 "
                        "autocast on a GPU, fp32 on a CPU)")
    p.add_argument("--temperature", type=float, default=None,
                   help="MaskGIT: sampling temperature (default: the generator's stored sampler, TiTok-L-32: 9.5)")
    p.add_argument("--temperature-schedule", choices=("linear", "constant", "cosine"), default=None,
                   help="MaskGIT: how the temperature changes over the steps (default: stored, TiTok: linear to 0)")
    p.add_argument("--softmax-annealing", action=argparse.BooleanOptionalAction, default=None,
                   help="MaskGIT: divide the logits by 0.5 + 0.8 (1 - t) (default: stored, TiTok's FID sampler: on)")
    p.add_argument("--guidance-schedule", choices=("linear", "constant", "power-cosine", "cosine"), default=None,
                   help="MaskGIT: how guidance ramps over the steps (default: stored, TiTok: linear from 1 to --cfg; "
                        "S-128: power-cosine)")
    p.add_argument("--guidance-exponent", type=float, default=None,
                   help="MaskGIT: the power-cosine schedule's exponent (default: stored; TiTok-S-128: 3)")
    p.add_argument("--top-k", type=int, default=None,
                   help="VAR: keep the k most likely codes (default: stored, 750 unless converted; 0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="VAR: keep the smallest set of codes with this much "
                   "mass (default: stored, 0.95 unless converted; 0 or 1 = all)")
    p.add_argument("--no-progress", action="store_true")


def cmd_sample(args: argparse.Namespace) -> None:
    if not args.out and not args.npz:
        raise TextokError("nothing to write: give --out grid.png and/or --npz samples.npz")
    inputs = [("--generator", args.generator), ("--tokenizer", args.tokenizer)]
    if args.out:
        check_output_image(args.out, inputs=inputs)
    if args.npz:
        check_output_file(args.npz, "--npz", inputs, outputs=[("--out", args.out)])
    if args.n < 1:
        raise TextokError(f"--n {args.n} must be positive")
    with distributed_session(args.device) as info:
        pipe = GenerationPipeline(args.generator, args.tokenizer, device=str(info.device) if info.enabled else args.device)
        labels = args.classes if args.classes is not None else (None if args.captions else pipe.default_labels())
        grid_cfg = args.cfg if args.cfg is not None else pipe.default_cfg()
        npz_cfg = args.cfg if args.cfg is not None else pipe.default_cfg(for_eval=True)
        kw = {"steps": args.steps, "sampler": args.sampler, "seed": args.seed, "cuda_graph": args.cuda_graphs,
              "temperature": args.temperature, "temperature_schedule": args.temperature_schedule,
              "softmax_annealing": args.softmax_annealing, "guidance_schedule": args.guidance_schedule,
              "guidance_exponent": args.guidance_exponent, "top_k": args.top_k, "top_p": args.top_p}
        for scale in (grid_cfg, npz_cfg):
            pipe.check_request(labels, args.captions, scale)  # refuse before any work
        if info.is_main and args.captions is None and pipe.bank_summary():
            print(pipe.bank_summary())
        if args.out and info.is_main:
            path = sample_grid(pipe, args.out, labels, args.captions, n=args.n, progress=not args.no_progress,
                               cfg_scale=grid_cfg, precision=args.precision or "auto", **kw)
            print(f"wrote {path} (guidance {grid_cfg:g})")
        if args.npz:
            path = write_npz_distributed(pipe, args.npz, args.num, labels, args.captions, args.batch_size, info,
                                         progress=not args.no_progress, cfg_scale=npz_cfg,
                                         precision=args.precision or NPZ_PRECISION, **kw)
            if info.is_main:
                why = f" ({pipe.spec.eval_note})" if args.cfg is None and pipe.spec.eval_note else ""
                print(f"wrote {args.num} samples to {path} with guidance {npz_cfg:g}{why} in "
                      f"{args.precision or NPZ_PRECISION}"
                      + (f" ({info.world} processes)" if info.enabled else ""))
