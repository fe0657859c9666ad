"""Latents for generator training: encode a dataset ONCE with a frozen tokenizer, then train on the tokens.

Why: the generator (DiT or MaskGIT) never needs pixels, and encoding every image at every step would cost
more than the generator itself. ``extract_latents`` writes a directory that a training run reads::

    OUT/shard-00000.safetensors   latents (M, N, d) float32 [+ codes of a discrete tokenizer: (M, N) for a
                                  TiTok, (M, P, L) for an ImageFolder (P branches, L = sum(pn^2) ids each,
                                  scale by scale), int16 (int32 above 32768 codes)], labels (M,) int64,
                                  index (M,) int64 (position in the source dataset)
    OUT/captions.jsonl            {"index": i, "label": l, "captions": [...]} per image, in shard order
    OUT/meta.json                 tokenizer (dir, type, config, sha256 of its weights), shapes (``code_shape``:
                                  the codes' shape per image), dataset spec, per-channel mean/std
    OUT/caption_bank.json         per-class captions of this split (CaptionBank), for decoding samples

Text tokenizers encode each image with its FIRST caption (all captions are stored; a text-to-image
generator trains on all of them). For a discrete tokenizer the latents are its quantized tokens rebuilt from
the codes (``quantizer.decode_codes``: for ImageFolder f_hat of all scales), so both kinds share one layout. The
per-channel mean/std over the whole set normalise the DiT's input
(the role of the 0.18215 scale factor of Stable Diffusion's VAE, but per channel and measured).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from ..data.factory import build_dataset
from ..data.folder import collate
from ..data.shards import ShardSet
from ..devices import resolve_device
from ..errors import TextokError
from ..io import (atomic_directory, atomic_write_text, check_replaceable, check_safetensors, read_json,
                  remove_stale, sha256_file)
from ..models.registry import load_tokenizer
from ..text.banks import CaptionBank

META = "meta.json"
CAPTIONS = "captions.jsonl"
BANK = "caption_bank.json"
SHARD = "shard-{:05d}.safetensors"


def code_dtype(codebook_size: int) -> torch.dtype:
    """The smallest signed integer type that holds every code id (ids are read back as int64)."""
    return torch.int16 if codebook_size <= 2**15 else torch.int32


@torch.no_grad()
def extract_latents(tokenizer: str | Path, data: str = "scenes", out: str | Path = "latents", *, split: str = "train",
                    num: int = 0, batch_size: int = 64, shard_size: int = 8192, seed: int = 0,
                    device: str = "auto", progress: bool = True) -> Path:
    """Encode ``num`` images (0 = all) of ``data``/``split`` with the tokenizer in ``tokenizer``; returns ``out``.

    The directory is written atomically: an interrupted extraction leaves no half-written ``out``. An existing
    ``out`` is replaced only when it is a latents directory (or empty); anything else is refused before any work.
    """
    if batch_size < 1 or shard_size < 1:
        raise TextokError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive")
    check_replaceable(out, (META,), what="latents")
    remove_stale(Path(out).parent, Path(out).name)  # what a killed extraction into the same --out left
    tok_dir = Path(tokenizer).resolve()
    dev = resolve_device(device)
    tok = load_tokenizer(tok_dir).eval().to(dev)
    cfg = tok.config
    discrete = tok.code_form != "tokens"  # integer codes (a VQ TiTok, an ImageFolder, a VQVAE)
    dataset = build_dataset(data, split, cfg.image_size, size=num, seed=seed)
    n_total = len(dataset)
    if n_total == 0:
        raise TextokError(f"{data!r} split {split!r} has no images to encode")
    text_in_encoder = bool(getattr(cfg, "text_in_encoder", False))
    N, d = cfg.num_tokens, cfg.token_channels

    out = Path(out)
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    count = 0
    skipped = 0
    labels_seen: set[int] = set()
    streamed_bank: dict[int, list[str]] = {}  # per-class captions of what was read (for a shard set)
    code_shape: list[int] = []
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=n_total, desc=f"encoding {data}/{split}", unit="img")
    with atomic_directory(out, markers=(META,)) as tmp:
        buf: dict[str, list[torch.Tensor]] = {"latents": [], "codes": [], "labels": [], "index": []}
        buffered, shard_id, shard_sizes = 0, 0, []
        cap_file = open(tmp / CAPTIONS, "w")
        try:
            for batch in _batches(dataset, batch_size):
                skipped += batch["skipped"]
                if bar is not None:
                    bar.update(batch["skipped"] + len(batch["captions"]))
                if not batch["captions"]:
                    continue
                images = batch["image"].to(dev)
                text = [c[0] for c in batch["captions"]] if text_in_encoder else None
                if discrete:
                    codes = tok.encode_codes(images, text)
                    z = tok.quantizer.decode_codes(codes)
                    buf["codes"].append(codes.cpu().to(code_dtype(tok.codebook_size)))
                    code_shape = list(codes.shape[1:])
                else:
                    z = tok.encode(images, text)
                z = z.float().cpu()
                if z.shape[1:] != (N, d):
                    raise TextokError(f"the tokenizer returned tokens of shape {tuple(z.shape[1:])}, expected ({N}, {d})")
                s1 += z.double().sum(dim=(0, 1))
                s2 += z.double().pow(2).sum(dim=(0, 1))
                count += z.shape[0]
                buf["latents"].append(z)
                buf["labels"].append(batch["label"])
                buf["index"].append(batch["index"])
                labels_seen.update(batch["label"].tolist())
                for caps, label, idx in zip(batch["captions"], batch["label"].tolist(), batch["index"].tolist()):
                    if label >= 0:
                        streamed_bank.setdefault(label, []).extend(caps)
                    cap_file.write(json.dumps({"index": idx, "label": label, "captions": list(caps)}) + "\n")
                buffered += z.shape[0]
                while buffered >= shard_size:
                    buffered = _flush(buf, tmp, shard_id, shard_size, shard_sizes)
                    shard_id += 1
            if buffered:
                _flush(buf, tmp, shard_id, buffered, shard_sizes)
        finally:
            cap_file.close()
            if bar is not None:
                bar.close()
        if count == 0:
            raise TextokError(f"none of the {n_total} images of {data!r} could be decoded")

        elements = count * N  # every token of every image is one sample of each channel
        mean = s1 / elements
        std = (s2 / elements - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
        bank_data = _caption_bank(dataset) if hasattr(dataset, "caption_bank") else streamed_bank
        class_names = [str(c) for c in getattr(dataset, "class_names", [])]
        labelled = bool(labels_seen) and min(labels_seen) >= 0 and bool(class_names)
        num_classes = len(class_names) if labelled else 0
        CaptionBank(bank_data, class_names if labelled else None).save(tmp / BANK)
        meta = {
            "format": "textok-latents-1",
            "tokenizer_dir": str(tok_dir),
            "tokenizer_type": tok.model_type,
            "tokenizer_config": cfg.to_dict(),
            "num_tokens": N,
            "channels": d,
            "discrete": discrete,
            "codebook_size": int(tok.codebook_size) if discrete else 0,
            "code_shape": code_shape,
            "code_layout": tok.code_layout(),
            "tokenizer_sha256": sha256_file(tok_dir / "model.safetensors"),
            "count": count,
            "skipped": skipped,
            "shards": shard_sizes,
            "num_classes": num_classes,
            "class_names": class_names if labelled else [],
            "uses_text": bool(getattr(cfg, "uses_text", False)),
            "text_in_encoder": text_in_encoder,
            "text_in_decoder": bool(getattr(cfg, "text_in_decoder", False)),
            "text_encoder": getattr(cfg, "text_encoder", ""),
            "text_max_length": int(getattr(cfg, "text_max_length", 64)),
            "dataset": {"data": data, "split": split, "num": num, "seed": seed},
            "mean": mean.tolist(),
            "std": std.tolist(),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    if skipped:
        print(f"skipped {skipped} images that could not be decoded")
    return out


def _flush(buf: dict[str, list[torch.Tensor]], tmp: Path, shard_id: int, size: int, sizes: list[int]) -> int:
    """Write the first ``size`` buffered rows as one shard, keep the rest buffered; returns the rows left."""
    joined = {k: torch.cat(v) for k, v in buf.items() if v}
    save_file({k: v[:size].contiguous() for k, v in joined.items()}, str(tmp / SHARD.format(shard_id)))
    sizes.append(size)
    for k, v in joined.items():
        buf[k] = [v[size:]] if v.shape[0] > size else []
    return joined["latents"].shape[0] - size


def _batches(dataset: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    """Collated batches in order: a map-style dataset by index, a shard set read front to back."""
    if isinstance(dataset, ShardSet):
        items: list[dict | None] = []
        for item in dataset.samples():
            items.append(item)
            if len(items) == batch_size:
                yield collate(items)
                items = []
        if items:
            yield collate(items)
        return
    n_total = len(dataset)
    for start in range(0, n_total, batch_size):
        yield collate([dataset[i] for i in range(start, min(n_total, start + batch_size))])


def _caption_bank(dataset: Any) -> dict[int, list[str]]:
    getter = getattr(dataset, "caption_bank", None)
    if getter is None:
        return {}
    return {int(k): list(v) for k, v in getter().items() if int(k) >= 0}


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a latents directory, with a clear error when it is not one."""
    path = Path(directory) / META
    if not path.is_file():
        raise TextokError(f"{directory} is not a latents directory ({META} is missing); "
                          "write one with `textok extract-latents`")
    meta = read_json(path, f"{path} (latents metadata)")
    needed = ("shards", "num_tokens", "channels", "mean", "std")
    missing = [k for k in needed if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise TextokError(f"{path} (latents metadata) is corrupt (no {missing[0]!r}); extract the latents again")
    return meta


class LatentDataset(torch.utils.data.Dataset):
    """All shards of a latents directory in memory; items are normalised latents, labels and captions.

    ``batch(indices)`` gathers a whole batch with one indexing op per tensor (what the training loop uses).
    """

    def __init__(self, directory: str | Path, normalize: bool = True) -> None:
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        shards = sorted(self.directory.glob("shard-*.safetensors"))
        if len(shards) != len(self.meta["shards"]):
            raise TextokError(f"{self.directory} lists {len(self.meta['shards'])} shards but holds {len(shards)}; "
                              "extract the latents again")
        for p in shards:
            check_safetensors(p, f"{p} (latents shard)")
        parts = [load_file(str(p)) for p in shards]
        self.latents = torch.cat([p["latents"] for p in parts]).float()
        self.labels = torch.cat([p["labels"] for p in parts]).long()
        self.index = torch.cat([p["index"] for p in parts]).long()
        self.codes = torch.cat([p["codes"] for p in parts]).long() if "codes" in parts[0] else None
        self.mean = torch.tensor(self.meta["mean"], dtype=torch.float32)
        self.std = torch.tensor(self.meta["std"], dtype=torch.float32)
        if normalize:
            self.latents = (self.latents - self.mean) / self.std
        self.normalized = normalize
        try:
            with open(self.directory / CAPTIONS, encoding="utf-8") as f:
                self.captions = [json.loads(line)["captions"] for line in f if line.strip()]
        except (ValueError, KeyError, TypeError):
            raise TextokError(f"{self.directory / CAPTIONS} is corrupt (a line is not a caption record); "
                              "extract the latents again") from None
        if len(self.captions) != len(self.latents):
            raise TextokError(f"{self.directory}: {len(self.captions)} caption rows for {len(self.latents)} latents; "
                              "extract the latents again")

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"latents": self.latents[i], "label": int(self.labels[i]), "captions": self.captions[i], "index": i}
        if self.codes is not None:
            item["codes"] = self.codes[i]
        return item

    def captions_of(self, i: int) -> list[str]:
        return self.captions[i]

    def batch(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = {"latents": self.latents[idx], "label": self.labels[idx], "index": idx,
               "captions": [self.captions[i] for i in indices]}
        if self.codes is not None:
            out["codes"] = self.codes[idx]
        return out

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)


def copy_latents_meta(latents_dir: str | Path, target: str | Path) -> None:
    """Put the latents' meta (normalisation, tokenizer dir) and caption bank beside a generator."""
    src, dst = Path(latents_dir), Path(target)
    meta = read_meta(src)
    meta["latents_dir"] = str(src.resolve())
    atomic_write_text(dst / "latents_meta.json", json.dumps(meta, indent=2) + "\n")
    if (src / BANK).is_file():
        shutil.copyfile(src / BANK, dst / BANK)


__all__ = ["extract_latents", "LatentDataset", "code_dtype", "read_meta", "copy_latents_meta"]
