"""A vision-language model that writes captions, loaded with ``transformers`` from a local directory.

TexTok's captions are written offline, once, by a VLM. The family is read from the directory's
``config.json`` (``model_type``), never guessed from its name, and nothing is downloaded:

* ``blip``: ``BlipForConditionalGeneration`` + its processor. A captioning model: the prompt is a text prefix
  the caption continues ("a photography of"), or empty for a plain caption; the caption keeps the prefix.
* ``llava``: an instruction-following image-text-to-text model through ``AutoModelForImageTextToText`` +
  ``AutoProcessor``. The prompt is an instruction put into the processor's chat template; the caption is
  the answer only.

(Qwen2-VL loads through the same auto classes, but its processor needs torchvision in transformers 5, which
textok does not install; it is refused with the others until it can be tested here.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from ..errors import TextokError

FAMILIES = {"blip": "BLIP (BlipForConditionalGeneration)", "llava": "LLaVA (AutoModelForImageTextToText)"}
# LLaVA-1.5's conversation format, used when the processor carries no chat template.
LLAVA_FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def vlm_family(path: str | Path) -> str:
    """The supported family of the model in ``path`` (its config's ``model_type``), or a one-line error."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise TextokError(f"VLM directory {path} does not exist (it must hold config.json, the weights and the "
                          "processor files; nothing is downloaded)")
    config = path / "config.json"
    if not config.is_file():
        raise TextokError(f"{path} holds no config.json: it is not a transformers model directory; give the "
                          f"directory of a saved vision-language model ({', '.join(FAMILIES)})")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise TextokError(f"{config} is not a JSON object; is {path} a saved transformers model?") from None
    if model_type not in FAMILIES:
        raise TextokError(f"{path} holds a {model_type!r} model, which `textok caption` does not support; "
                          f"use one of: {', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}")
    return model_type


class VLMCaptioner:
    """A frozen VLM + its processor: ``caption(images, prompts)`` -> one caption per image."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_new_tokens: int = 40) -> None:
        self.path = Path(path).expanduser()
        self.family = vlm_family(self.path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # lazily: transformers is heavy (seconds to import) and only captioning and the T5 path need it
        from transformers import AutoModelForImageTextToText, AutoProcessor, BlipForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model_cls = BlipForConditionalGeneration if self.family == "blip" else AutoModelForImageTextToText
        try:
            self.processor = AutoProcessor.from_pretrained(str(self.path), local_files_only=True)
            self.model = model_cls.from_pretrained(str(self.path), local_files_only=True, dtype=dtype)
        except (OSError, ValueError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TextokError(f"could not load the {FAMILIES[self.family]} VLM from {self.path}: {first}") from None
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.tokenizer = self.processor.tokenizer
        if self.family == "llava":
            self.tokenizer.padding_side = "left"  # a decoder-only model continues the last position of each row

    def chat_text(self, prompt: str) -> str:
        """The model's input text for one instruction (LLaVA: the processor's chat template)."""
        if self.family == "blip":
            return prompt
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return LLAVA_FALLBACK_TEMPLATE.format(prompt=prompt)

    @torch.no_grad()
    def caption(self, images: list[Image.Image], prompts: list[str], *, sample: bool = True, temperature: float = 1.0,
                top_p: float = 0.9, seed: int | None = None) -> list[str]:
        """One caption per (image, prompt); ``sample`` draws with ``seed`` (the global RNG), else greedy. An
        empty string means the model wrote nothing beyond the prompt."""
        if seed is not None:
            torch.manual_seed(seed)
        texts = [self.chat_text(p) for p in prompts]
        blank = self.family == "blip" and not any(t.strip() for t in texts)
        inputs = self.processor(images=images, text=None if blank else texts, return_tensors="pt",
                                **({} if blank else {"padding": True}))
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        gen = {"max_new_tokens": self.max_new_tokens, "do_sample": sample}
        if sample:
            gen.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**inputs, **gen)
        if self.family == "llava":  # the answer only: the prompt's positions are cut off
            out = out[:, inputs["input_ids"].shape[1]:]
        captions = [" ".join(c.split()) for c in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        if self.family == "blip":  # BLIP repeats its prefix: a caption that adds nothing to it is empty
            prefixes = [" ".join(self.tokenizer.decode(self.tokenizer(t, add_special_tokens=False)["input_ids"],
                                                       skip_special_tokens=True).split()) for t in texts]
            captions = [c if c[len(p):].strip() else "" for c, p in zip(captions, prefixes)]
        return captions


__all__ = ["FAMILIES", "VLMCaptioner", "vlm_family"]
