"""``convert``: a published checkpoint -> a textok model directory (``config.json`` + ``model.safetensors``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..errors import TextokError
from ..hub import CONFIG_NAME
from ..io import atomic_file, check_output, check_output_file, sha256_file
from .checkpoint import read_checkpoint, weights_file
from .formats import FORMATS
from .manifest import Variant, load_manifest, match_variant


@dataclasses.dataclass
class Converted:
    """What :func:`convert` wrote."""

    directory: Path
    format: str
    variant: Variant
    model: nn.Module


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise TextokError(f"unknown format {fmt!r}: --from takes one of {', '.join(FORMATS)}")


def convert(fmt: str, source: str | Path, out: str | Path, variant: str | None = None,
            tokenizer: str | Path | None = None, text_encoder: str | None = None,
            teacher_out: str | Path | None = None) -> Converted:
    """Read ``source`` (a published checkpoint of ``fmt``, or the folder holding it), check its keys and shapes
    against the committed manifest, and write the equivalent textok model to ``out`` with ``save_pretrained``.

    ``variant`` forces one of the manifest's layouts (by default the one the file matches exactly). A generator
    needs ``tokenizer``: the (converted) tokenizer directory whose codes it models, recorded as the one
    ``textok sample`` decodes with. A text-conditioned tokenizer (TA-TiTok) needs ``text_encoder``, the textok
    spec of its text tower (``clip:/local/dir``). ``teacher_out`` (ImageFolder) also writes the training teacher
    stored in the file, as a ``.safetensors`` that textok's ``dinov2:FILE`` teacher reads. The output's
    ``config.json`` records where the weights came from under ``converted_from``: format, variant, file, its sha256
    and the release's published settings."""
    check_format(fmt)
    spec = FORMATS[fmt]
    if spec.kind == "generator" and tokenizer is None:
        raise TextokError(f"--from {fmt} is a generator: give --tokenizer DIR, the converted tokenizer whose codes "
                          "it models (textok convert --from titok ... --out DIR)")
    check_output(out, [("SOURCE", source), ("--tokenizer", tokenizer)], kind="directory", markers=(CONFIG_NAME,),
                 what="textok model")
    _check_not_foreign_model(Path(out))
    if teacher_out is not None:
        if spec.teacher is None:
            raise TextokError(f"--from {fmt} stores no training teacher: drop --teacher-out")
        check_output_file(teacher_out, "--teacher-out", inputs=[("SOURCE", source)], outputs=[("--out", out)])
    file = weights_file(source)
    state, container = read_checkpoint(file, spec.containers)
    if spec.prepare is not None:
        state = spec.prepare(state)
    chosen = match_variant(state, load_manifest(fmt), str(file), variant)
    if spec.settings is not None:
        chosen = spec.settings(file, chosen)
    if text_encoder is not None and not spec.text_encoder:
        raise TextokError(f"--from {fmt} has no text: drop --text-encoder")
    model = spec.build(state, chosen, **({"text_encoder": text_encoder} if spec.text_encoder else {}))
    if teacher_out is not None:
        assert spec.teacher is not None
        teacher = {k: v.contiguous() for k, v in spec.teacher(state).items()}
        with atomic_file(teacher_out) as tmp:
            save_file(teacher, str(tmp))
    record: dict[str, Any] = {"format": fmt, "variant": chosen.name, "file": file.name, "sha256": sha256_file(file),
                              "published_settings": chosen.settings}
    if container:  # a training checkpoint: the key path of the weights that were converted
        record["container"] = list(container)
    extra: dict[str, Any] = {"converted_from": record}
    if spec.kind == "generator":
        assert tokenizer is not None and spec.sampler is not None and spec.record is not None
        record["textok_sampler"] = spec.sampler(chosen)
        extra["latents_meta"] = spec.record(model, Path(tokenizer))
        if spec.diffusion is not None:
            extra["diffusion"] = spec.diffusion(chosen)
    directory = model.save_pretrained(out, extra=extra)  # type: ignore[operator]
    return Converted(Path(directory), fmt, chosen, model)


def _check_not_foreign_model(out: Path) -> None:
    """A folder with another project's config.json (a Hub snapshot) is not a textok model to replace."""
    config = out / CONFIG_NAME
    if out.is_dir() and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            data = None
        if not isinstance(data, dict) or "textok_version" not in data:
            raise TextokError(f"--out {out} holds a config.json that textok did not write (another project's model?); "
                              "choose a new --out")


__all__ = ["Converted", "convert", "check_format"]
