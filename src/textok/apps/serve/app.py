"""What the page asks for, without HTTP: load tokenizers and generators, reconstruct, swap captions, sample.

Every method returns plain JSON-ready dicts and raises :class:`TextokError` (one line, shown on the page) for
anything the user can fix. Requests run in parallel: one lock guards only the list of loaded models (held to
copy it or add to it, never while a model runs), and a second serialises text encoding, because a Hugging Face
tokenizer is not safe to call from two threads at once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ...data.images import decode_image
from ...data.scenes import CaptionedScenes
from ...errors import TextokError
from ...eval.image_metrics import psnr
from ...generate.sampling import GenerationPipeline
from ...models.registry import load_tokenizer
from ...text.encoders import load_text_encoder
from .generators import MAX_CAPTION_CHARS, MAX_SAMPLES, LoadedGenerator, check_caption, load_generator
from .names import distinct_names, model_name, one_line, same_directory
from .pictures import heat_map, legend_colours, png_data_url, to_uint8, token_picture

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # larger files are refused before decoding
MAX_PIXELS = 50_000_000  # larger images are refused (decoding them would take seconds and gigabytes)
WORK_SIZE = 512  # uploads are center-cropped and resized to at most this square; each model resizes again
SCENE_SPLIT = "test"  # the embedded scenes offered on the page: held out from training
MAX_MODELS = 8  # tokenizers loaded at once (each holds its weights in memory; the page shows them side by side)
TEXT_CACHE = 256  # captions whose text states are kept between requests
NOT_AN_IMAGE = "that file is not an image this page can read (PNG, JPEG, WebP, GIF, BMP or TIFF): choose an image file"


def _db(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR in dB of one image against another, both clamped to [-1, 1], for JSON: rounded; None when
    infinite (identical images)."""
    value = float(psnr(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).mean())
    return round(value, 2) if math.isfinite(value) else None


def describe_tokens(model: Any) -> dict[str, Any]:
    """How many tokens one image becomes and how many bits that is (continuous tokens counted as float32)."""
    c = model.config
    if model.code_form == "scales":  # multi-scale codes (ImageFolder, VQVAE): sum(pn^2) per branch
        q = c.quantizer
        codes, k = int(q.codes_per_image), int(model.codebook_size)
        return {"count": codes, "bits": codes * math.log2(k),
                "what": f"{codes} codes of {k} ({math.log2(k):g} bits each), {q.branches} branch(es)"}
    if model.code_form == "codes":
        n, k = int(c.num_tokens), int(model.codebook_size)
        return {"count": n, "bits": n * math.log2(k), "what": f"{n} codes of {k} ({math.log2(k):g} bits each)"}
    n, d = int(c.num_tokens), int(c.token_channels)
    return {"count": n, "bits": n * d * 32, "what": f"{n} tokens × {d} float32 values"}


def text_sides(config: Any) -> str:
    sides = [s for s, on in (("encoder", config.text_in_encoder), ("decoder", config.text_in_decoder)) if on]
    return "text in " + " + ".join(sides) if sides else "no text"


@dataclasses.dataclass
class LoadedModel:
    directory: str
    model: Any = None
    error: str | None = None

    def info(self, name: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name or model_name(self.directory), "directory": self.directory,
                               "error": self.error}
        if self.model is not None:
            c = self.model.config
            out.update(kind=self.model.model_type, image_size=c.image_size,
                       text=text_sides(c), reads_text=bool(c.uses_text), decoder_reads_text=bool(c.text_in_decoder),
                       tokens=describe_tokens(self.model))
        return out


def load_model(directory: str | Path) -> LoadedModel:
    """A tokenizer directory -> a loaded model, or the reason it did not load (never raises)."""
    directory = str(directory)
    try:
        return LoadedModel(directory, load_tokenizer(directory).eval())
    except TextokError as err:
        return LoadedModel(directory, error=one_line(err))
    except Exception as err:  # noqa: BLE001 - a broken file must not stop the server; say what it was
        return LoadedModel(directory, error=f"{directory} could not be loaded ({type(err).__name__}: {one_line(err)})")


class CaptionNeeded(TextokError):
    """A text tokenizer asked to run without a caption: the page waits for one rather than showing an error."""


class ServeApp:
    """The state behind the page: the loaded tokenizers, an optional generator and the embedded scenes."""

    def __init__(self, models: list[str | Path], generators: str | Path | list[str | Path] | None = None,
                 allow_model_paths: bool = True) -> None:
        self.lock = threading.Lock()  # guards self.models (copy it or add to it; never held while a model runs)
        self.text_lock = threading.Lock()  # text encoding and its cache: a HF tokenizer is not thread-safe
        self.scene_lock = threading.Lock()
        unique: list[str] = []
        for d in map(str, models):
            if not any(same_directory(d, u) for u in unique):
                unique.append(d)
        if len(unique) > MAX_MODELS:
            raise TextokError(f"{len(unique)} tokenizers given; the page shows at most {MAX_MODELS}: drop some --model")
        self.models = [load_model(d) for d in unique]
        self.allow_model_paths = allow_model_paths
        if generators is None or isinstance(generators, (str, Path)):
            generators = [generators] if generators else []
        self.generators = [load_generator(g) for g in generators]
        self._scenes: dict[int, CaptionedScenes] = {}
        self._text_cache: OrderedDict = OrderedDict()

    # ---- what is loaded ------------------------------------------------------------------------------
    @property
    def pipe(self) -> GenerationPipeline | None:
        """The first generator that loaded (None without one)."""
        return next((g.pipe for g in self.generators if g.pipe is not None), None)

    def info(self) -> dict[str, Any]:
        models = self.model_infos()
        gens = []
        for i, g in enumerate(self.generators):
            mine = [m["name"] for m in models if g.pipe is not None and same_directory(m["directory"], g.pipe.tokenizer_dir)]
            gens.append({**g.info(mine[0] if mine else None), "index": i})
        return {"models": models, "generators": gens, "max_models": MAX_MODELS, "max_samples": MAX_SAMPLES,
                "scene_count": len(self._scene_set(128)), "max_upload_bytes": MAX_UPLOAD_BYTES,
                "allow_model_paths": self.allow_model_paths, "legends": legend_colours()}

    def loaded(self) -> list[LoadedModel]:
        """A snapshot of the model list (requests work on it without holding the lock)."""
        with self.lock:
            return list(self.models)

    def model_infos(self) -> list[dict[str, Any]]:
        models = self.loaded()
        return [m.info(n) for m, n in zip(models, distinct_names([m.directory for m in models]))]

    def _known(self, directory: str) -> LoadedModel | None:
        return next((m for m in self.models if m.model is not None and same_directory(m.directory, directory)), None)

    def add_model(self, directory: str) -> dict[str, Any]:
        """Load one more tokenizer; one already loaded (any spelling of its path) is answered, not loaded twice."""
        if not self.allow_model_paths:
            raise TextokError("loading models from the page is off when the server listens beyond this machine")
        directory = (directory or "").strip()
        if not directory:
            raise TextokError("type the path of a tokenizer directory (config.json + model.safetensors)")
        with self.lock:
            known = self._known(directory)
            if known is None and sum(m.model is not None for m in self.models) >= MAX_MODELS:
                raise TextokError(f"{MAX_MODELS} tokenizers are loaded, the most this page holds: restart "
                                  "`textok serve` with the ones to compare")
        if known is None:
            loaded = load_model(directory)  # slow: outside the lock, so requests go on meanwhile
            if loaded.error:
                raise TextokError(loaded.error)
            with self.lock:  # a second request may have loaded it (or filled the list) meanwhile
                known = self._known(directory)
                if known is None:
                    if sum(m.model is not None for m in self.models) >= MAX_MODELS:
                        raise TextokError(f"{MAX_MODELS} tokenizers are loaded, the most this page holds")
                    self.models.append(loaded)
        infos = self.model_infos()
        mine = known or loaded
        return {**next(i for i, m in zip(infos, self.loaded()) if m is mine), "already_loaded": known is not None}

    # ---- images ----------------------------------------------------------------------------------------
    def _scene_set(self, size: int) -> CaptionedScenes:
        with self.scene_lock:
            if size not in self._scenes:
                self._scenes[size] = CaptionedScenes(image_size=size, split=SCENE_SPLIT)
            return self._scenes[size]

    def scenes(self, start: int = 0, count: int = 12) -> list[dict[str, Any]]:
        """Thumbnails (128 px) and captions of embedded held-out scenes ``start .. start + count``."""
        data = self._scene_set(128)
        start = int(start) % len(data)
        items = [data[i] for i in range(start, min(len(data), start + max(1, min(int(count), 48))))]
        return [{"index": it["index"], "image": png_data_url(to_uint8(it["image"])), "captions": it["captions"]}
                for it in items]

    def prepare_upload(self, data: bytes) -> dict[str, Any]:
        """An uploaded file -> the square working image (PNG data URL) and notes on what was done to it."""
        if not data:
            raise TextokError("the upload is empty: choose an image file")
        if len(data) > MAX_UPLOAD_BYTES:
            raise TextokError(f"the file is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except Image.DecompressionBombError:
            raise TextokError(f"the image is too large to decode safely (over {MAX_PIXELS // 10**6} megapixels)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise TextokError(NOT_AN_IMAGE) from None
        if w * h > MAX_PIXELS:
            raise TextokError(f"the image is {w}×{h} ({w * h / 1e6:.0f} megapixels), more than the "
                              f"{MAX_PIXELS // 10**6} this page decodes: downscale it first")
        side = min(w, h, WORK_SIZE)
        image = self._decode(data, side)
        notes = []
        if max(w, h) > WORK_SIZE:
            notes.append(f"large image ({w}×{h}): center-cropped and resized to {side}×{side}")
        elif w != h:
            notes.append(f"center-cropped from {w}×{h} to {side}×{side}")
        return {"image": png_data_url(to_uint8(image)), "width": w, "height": h, "notes": notes}

    @staticmethod
    def _decode(data: bytes, size: int) -> torch.Tensor:
        try:
            return decode_image(data, size)
        except Image.DecompressionBombError:
            raise TextokError(f"the image is too large to decode safely (over {MAX_PIXELS // 10**6} megapixels)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise TextokError(f"the image could not be decoded ({type(err).__name__}); is the file complete?") from None

    def source_image(self, source: dict[str, Any], size: int) -> torch.Tensor:
        """``{"scene": i}`` or ``{"image": data URL}`` -> (1, 3, size, size) in [-1, 1]."""
        if source.get("scene") is not None:
            data = self._scene_set(size)
            i = int(source["scene"])
            if not 0 <= i < len(data):
                raise TextokError(f"scene {i} does not exist (0..{len(data) - 1})")
            return data[i]["image"][None]
        url = source.get("image")
        if not isinstance(url, str) or not url:
            raise TextokError("pick an image first: upload one or choose a scene")
        try:
            raw = base64.b64decode(url.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise TextokError("the image sent by the page is not valid base64; upload it again") from None
        if len(raw) > MAX_UPLOAD_BYTES:
            raise TextokError(f"the image is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        return self._decode(raw, size)[None]

    # ---- reconstruction --------------------------------------------------------------------------------
    def _text(self, config: Any, caption: str, notes: list[str]):
        """The caption's text states, remembered across requests (encoding one costs more than the models)."""
        key = (config.text_encoder, config.text_max_length, caption)
        with self.text_lock:
            if key in self._text_cache:
                self._text_cache.move_to_end(key)
                emb, warned = self._text_cache[key]
            else:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    emb = load_text_encoder(config.text_encoder, config.text_max_length).encode([caption])
                warned = [one_line(w.message) for w in caught if "caption" in str(w.message)]
                self._text_cache[key] = (emb, warned)
                if len(self._text_cache) > TEXT_CACHE:
                    self._text_cache.popitem(last=False)
        notes.extend(w for w in warned if w not in notes)
        return emb

    def reconstruct(self, source: dict[str, Any], caption: str = "", swap_caption: str = "") -> dict[str, Any]:
        """Every loaded tokenizer encodes the image (with the caption where it reads text) and decodes it;
        with ``swap_caption``, the same tokens are decoded again with that caption."""
        caption, swap_caption = check_caption(caption), check_caption(swap_caption, "swap caption")
        models = self.loaded()
        names = distinct_names([m.directory for m in models])
        loaded_models = [(m, n) for m, n in zip(models, names) if m.model is not None]
        if not loaded_models:
            raise TextokError("no tokenizer is loaded: start `textok serve --model DIR` or add one below")
        t0 = time.perf_counter()
        results: list[dict[str, Any]] = []
        with torch.inference_mode():
            # A bad image is one message for the page, raised here before any model runs.
            images = {s: self.source_image(source, s) for s in {m.model.config.image_size for m, _ in loaded_models}}
            for loaded, name in loaded_models:
                try:
                    image = images[loaded.model.config.image_size]
                    results.append(self._reconstruct_one(loaded, name, image, caption, swap_caption))
                except TextokError as err:  # this model cannot serve the request (e.g. it needs a caption)
                    results.append({**loaded.info(name), "message": one_line(err),
                                    "needs_caption": isinstance(err, CaptionNeeded)})
        scale = max([r["diff_max"] for r in results if "diff_max" in r] or [0.0])
        for r in results:
            if "recon_tensor" in r:  # one colour scale for all the heat maps, so they compare side by side
                r["heat"], _ = heat_map(r.pop("recon_tensor"), r.pop("original_tensor"), scale)
        return {"results": results, "heat_scale": scale, "ms": round((time.perf_counter() - t0) * 1000, 1)}

    def _reconstruct_one(self, loaded: LoadedModel, name: str, image: torch.Tensor, caption: str,
                         swap: str) -> dict[str, Any]:
        model, c = loaded.model, loaded.model.config
        notes: list[str] = []
        if c.uses_text and not caption:
            raise CaptionNeeded("this tokenizer reads text: type a caption (an empty one is refused, not replaced)")
        emb = self._text(c, caption, notes) if c.uses_text else None
        if caption and not c.uses_text:
            notes.append("no text: the caption is not used")
        t0 = time.perf_counter()
        z = model.encode(image, emb)
        recon = model.decode(z, emb).float().clamp(-1, 1)
        ms = (time.perf_counter() - t0) * 1000
        top = float((recon[0] - image[0]).abs().mean(0).max()) * 127.5  # in 0-255 levels, as heat_map measures
        out = {**loaded.info(name), "original": png_data_url(to_uint8(image[0])), "recon": png_data_url(to_uint8(recon[0])),
               "psnr": _db(recon, image), "diff_max": top, "tokens_picture": token_picture(z[0]),
               "tokens_peak": float(z[0].detach().float().abs().max()),
               "token_shape": list(z.shape[1:]), "model_ms": round(ms, 1), "notes": notes,
               "recon_tensor": recon[0], "original_tensor": image[0]}
        if swap:
            out["swap"] = self._swap(model, z, recon, image, swap, notes)
        return out

    def _swap(self, model: Any, z: torch.Tensor, recon: torch.Tensor, image: torch.Tensor, swap: str,
              notes: list[str]) -> dict[str, Any]:
        c = model.config
        if not c.text_in_decoder:
            return {"caption": swap,
                    "message": "its decoder does not read text: another caption cannot change this reconstruction"}
        other = model.decode(z, self._text(c, swap, notes)).float().clamp(-1, 1)
        heat, top = heat_map(other[0], recon[0])
        change = float((other - recon).abs().mean()) * 127.5
        return {"caption": swap, "recon": png_data_url(to_uint8(other[0])), "heat": heat, "psnr": _db(other, image),
                "change_mean": round(change, 2), "change_max": round(top, 1)}

    # ---- generation --------------------------------------------------------------------------------------
    def generate(self, generator: int = 0, **request: Any) -> dict[str, Any]:
        """Samples from generator number ``generator`` (see :meth:`LoadedGenerator.generate` for ``request``)."""
        if not self.generators:
            raise TextokError("no generator is loaded: start with --generator DIR")
        if not 0 <= generator < len(self.generators):
            raise TextokError(f"generator {generator} does not exist (0..{len(self.generators) - 1})")
        return self.generators[generator].generate(self.text_lock, **request)

    def warm_up(self) -> None:
        """One reconstruction of a scene, so the text encoder is loaded before the first request."""
        try:
            caption = self._scene_set(32).captions_of(0)[0]
            self.reconstruct({"scene": 0}, caption)
        except TextokError:
            pass


__all__ = ["ServeApp", "LoadedModel", "LoadedGenerator", "load_model", "describe_tokens", "model_name",
           "distinct_names", "MAX_UPLOAD_BYTES", "MAX_MODELS", "MAX_CAPTION_CHARS", "MAX_SAMPLES"]
