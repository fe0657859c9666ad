"""Build the files the GPU suite needs on a machine with no network and no textok wheels installed.

The GPU machine has PyTorch, transformers and onnx but no model weights, and at most 64 MiB of the working
tree travels to it. This writes, into ``--out`` (default ``.gpu-pack/``, ignored by git):

* ``flowers102-64.tar.gz``: the Flowers-102 64-px set, gzip-compressed (the tar's 512-byte headers and
  padding shrink; 29.4 MB -> ~17 MB);
* ``minilm-flowers/``: all-MiniLM-L6-v2 with float16 weights and only the vocabulary rows the set's captions
  use, as a plain transformers directory (``model.text_encoder=hf:...``). Pruning is checked, not assumed:
  every caption must tokenize to the same word pieces with the pruned vocabulary as with the full one, and
  the states of a sample of captions are compared with the full float32 model (the float16 rounding of the
  weights is the only difference; its size is recorded);
* ``open_nsfw.safetensors``: open_nsfw converted from the wheel's ONNX graph to this package's module,
  float16 (``TEXTOK_OPENNSFW_WEIGHTS``), with its feature error against float32 recorded;
* ``manifest.json``: sizes, sha256 and the two checks.

    python benchmarks/gpu_pack.py --data $TEXTOK_DATA/flowers102-64.tar          # ~1 minute on 2 cores
    python benchmarks/gpu_pack.py --cpu-smoke --out /tmp/pack                      # tiny: for the tests
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textok.errors import TextokError  # noqa: E402
from textok.io import sha256_file  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flowers102-64.tar"
TRAVEL_LIMIT = 64 * 2**20  # what the device tool carries: tracked + untracked files + carried paths
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_captions(data: Path) -> list[str]:
    """Every caption of a tar / folder with a captions.jsonl (train and held-out splits)."""
    if data.is_dir():
        lines = (data / "captions.jsonl").read_text().splitlines()
    else:
        with tarfile.open(data) as tar:
            member = next((m for m in tar if m.name.lstrip("./") == "captions.jsonl"), None)
            if member is None:
                raise TextokError(f"{data} has no captions.jsonl")
            lines = tar.extractfile(member).read().decode().splitlines()
    out: list[str] = []
    for line in lines:
        if line.strip():
            row = json.loads(line)
            caps = row.get("captions", row.get("caption"))
            out += [caps] if isinstance(caps, str) else list(caps)
    return sorted({c.strip() for c in out if c.strip()})


def prune_minilm(source: Path, captions: list[str], out: Path, check_sample: int) -> dict:
    """Write a float16 MiniLM keeping only the vocabulary rows ``captions`` use; verify tokenization of every
    caption and the states of ``check_sample`` of them against the full model."""
    from transformers import AutoModel, AutoTokenizer, BertTokenizerFast

    full_tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    ids = full_tok(captions, add_special_tokens=True)["input_ids"]
    used = sorted({i for row in ids for i in row} | {full_tok.convert_tokens_to_ids(t) for t in SPECIAL})
    vocab = full_tok.convert_ids_to_tokens(used)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    import inspect

    source_kw = ({"vocab": {t: i for i, t in enumerate(vocab)}}  # transformers >= 5
                 if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters
                 else {"vocab_file": str(out / "vocab.txt")})
    tok = BertTokenizerFast(**source_kw, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None,
                            model_max_length=full_tok.model_max_length)
    tok.save_pretrained(str(out))
    new_of_old = {old: new for new, old in enumerate(used)}
    pruned_ids = tok(captions, add_special_tokens=True)["input_ids"]
    mismatched = sum(1 for a, b in zip(ids, pruned_ids) if [new_of_old[i] for i in a] != b)
    if mismatched:
        raise TextokError(f"the pruned vocabulary tokenizes {mismatched} captions differently; keep the full one")

    model = AutoModel.from_pretrained(str(source), local_files_only=True).float().eval()
    pruned = AutoModel.from_pretrained(str(source), local_files_only=True).float().eval()
    rows = model.get_input_embeddings().weight.data[used].clone()
    emb = torch.nn.Embedding(len(used), rows.shape[1], padding_idx=new_of_old[full_tok.pad_token_id])
    emb.weight.data.copy_(rows)
    pruned.set_input_embeddings(emb)
    pruned.config.vocab_size = len(used)
    pruned.config.pad_token_id = new_of_old[full_tok.pad_token_id]
    pruned.half().save_pretrained(str(out))

    reloaded = AutoModel.from_pretrained(str(out), local_files_only=True).float().eval()
    sample = captions[:: max(1, len(captions) // check_sample)][:check_sample]
    with torch.no_grad():
        a = full_tok(sample, padding=True, return_tensors="pt")
        b = tok(sample, padding=True, return_tensors="pt")
        ref = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).last_hidden_state
        got = reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    m = a["attention_mask"].bool()
    rel = float((got[m] - ref[m]).norm() / ref[m].norm())
    return {"vocab_rows": len(used), "captions_checked_tokenization": len(captions),
            "states_checked": len(sample), "states_relative_error_fp16_weights": rel}


def convert_opennsfw(out: Path) -> dict:
    from textok.nets.opennsfw import OpenNSFW

    net = OpenNSFW(size=64)
    net.save_weights(out, torch.float16)
    half = OpenNSFW(out, size=64)
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref, got = net.pooled(x), half.pooled(x)
    return {"pooled_relative_error_fp16_weights": float((got - ref).norm() / ref.norm())}


def tree_bytes(root: Path) -> int:
    """Bytes the device tool would carry from the repository: tracked + untracked-not-ignored files."""
    import subprocess

    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file())


def build(data: Path, out: Path, check_sample: int = 256, smoke: bool = False) -> dict:
    from textok.text.encoders import minilm_path

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data_out = out / (data.name + ".gz" if data.suffix == ".tar" else data.name)
    if data.suffix == ".tar":
        with open(data, "rb") as src, gzip.open(data_out, "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copy(data, data_out)
    captions = read_captions(data)
    minilm = prune_minilm(minilm_path(), captions, out / "minilm-flowers", check_sample)
    nsfw = convert_opennsfw(out / "open_nsfw.safetensors")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    pack_bytes = sum(p.stat().st_size for p in files)
    manifest = {
        "data": data.name, "captions": len(captions), "minilm": minilm, "opennsfw": nsfw,
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        "pack_bytes": pack_bytes, "seconds": round(time.time() - t0, 1),
    }
    if not smoke:
        tree = tree_bytes(ROOT)
        manifest.update(tree_bytes=tree, travel_bytes=tree + pack_bytes, travel_limit=TRAVEL_LIMIT)
        if tree + pack_bytes > TRAVEL_LIMIT:
            raise TextokError(f"the working tree ({tree / 2**20:.1f} MiB) and the pack ({pack_bytes / 2**20:.1f} MiB) "
                              f"exceed the {TRAVEL_LIMIT / 2**20:.0f} MiB that travels to the GPU machine")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-pack")
    p.add_argument("--check-sample", type=int, default=256, help="captions whose states are compared")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny captioned set made here, for the tests")
    args = p.parse_args()
    data = args.data
    if args.cpu_smoke:
        from make_tiny_data import write_tiny_captioned_tar

        data = write_tiny_captioned_tar(args.out / "src" / "tiny-64.tar", images=24, size=64)
        args.check_sample = 8
    m = build(data, args.out, args.check_sample, smoke=args.cpu_smoke)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"pack {args.out}: {mib(m['pack_bytes'])} ({m['captions']} captions, MiniLM {m['minilm']['vocab_rows']} "
          f"vocabulary rows; fp16 state error {m['minilm']['states_relative_error_fp16_weights']:.1e}, open_nsfw "
          f"{m['opennsfw']['pooled_relative_error_fp16_weights']:.1e})")
    if "travel_bytes" in m:
        print(f"travels with the working tree: {mib(m['travel_bytes'])} of {mib(m['travel_limit'])}")


if __name__ == "__main__":
    main()
