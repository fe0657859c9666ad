"""Tiny randomly initialised vision-language models saved like real ones, made offline on the spot: a BLIP
captioner and a LLaVA (CLIP vision tower + Llama), each with a word-level tokenizer and its processor. Their
captions are gibberish; the loading, prompting, batching and decoding paths are the real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ("a an the photo of red blue green dog cat fish bird on in with small large picture image this is and "
         "grass water sky sitting standing near").split()


def _word_tokenizer(special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[1] if special[0] == "[PAD]" else special[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return vocab, tok


def make_blip(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    from tokenizers import processors
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor,
                              PreTrainedTokenizerFast)

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab, tok = _word_tokenizer(special)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
                              tokenizer=fast)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3,
                max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_llava(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    from transformers import (CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    special = ["<unk>", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":"]
    vocab, tok = _word_tokenizer(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<unk>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT :{% endif %}")
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=template,
                               num_additional_image_tokens=1)
    text = dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, eos_token_id=2,
                pad_token_id=0, bos_token_id=1)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=8, projection_dim=32)
    torch.manual_seed(seed)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=vocab["<image>"],
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def silence_blip(path: Path) -> Path:
    """Make a saved BLIP end every caption at once (the failure of a VLM that writes nothing): its output bias
    favours [SEP] by a margin no hidden state can beat."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    bias = weights["text_decoder.cls.predictions.bias"]
    bias.zero_()
    bias[3] = 1e4
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def image_folder(root: Path, classes: dict[str, int], size: int = 24, seed: int = 0, split: str | None = None) -> Path:
    """``root/[split/]<class>/<i>.jpg``: small random JPEGs, a colour per class."""
    rng = np.random.default_rng(seed)
    for c, (name, count) in enumerate(classes.items()):
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = np.array([(60 + 90 * c) % 256, (200 - 70 * c) % 256, (30 + 50 * c) % 256], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 40, (size, size + 4, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root
