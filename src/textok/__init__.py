"""textok: text-conditioned image tokenization (TexTok) and generation over the tokens (DiT), with the sibling
tokenizers TiTok and ImageFolder and their generators (MaskGIT, VAR).

>>> from textok import TexTok, TexTokConfig
>>> tok = TexTok(TexTokConfig.preset("textok-tiny"))
>>> z = tok.encode(images, captions)                 # images (B, 3, H, W) in [-1, 1] -> tokens (B, N, 8)
>>> x = tok.decode(z, captions)                      # -> images in [-1, 1]
>>> tok = load_tokenizer("runs/demo/textok/final")   # any tokenizer a training run saved
>>> dit, record = load_generator("runs/demo-gen/dit/final")

Every model takes its own small config dataclass (``XConfig.preset(name)``, ``.override(["key=value"])``); the
tokenizers and DiT/MaskGIT save and load themselves (``save_pretrained`` / ``from_pretrained``).
"""

import importlib

from .version import __version__

# The public names and the modules that define them, imported on first use (PEP 562), so that `import textok`
# (and `textok --help`) does not load torch and every model.
_EXPORTS = {"Config": ".config", "TextokError": ".errors", "DiT": ".models.dit", "DiTConfig": ".models.dit",
            "ImageFolder": ".models.imagefolder", "ImageFolderConfig": ".models.imagefolder",
            "MaskGIT": ".models.maskgit", "MaskGITConfig": ".models.maskgit", "load_generator": ".models.registry",
            "load_tokenizer": ".models.registry", "TexTok": ".models.textok", "TexTokConfig": ".models.textok",
            "TiTok": ".models.titok", "TiTokConfig": ".models.titok", "VAR": ".models.var", "VARConfig": ".models.var",
            "TextEmbeddings": ".text.embeddings"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'textok' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["Config", "DiT", "DiTConfig", "ImageFolder", "ImageFolderConfig", "MaskGIT", "MaskGITConfig", "TexTok",
           "TexTokConfig", "TextEmbeddings", "TextokError", "TiTok", "TiTokConfig", "VAR", "VARConfig", "__version__",
           "load_generator", "load_tokenizer"]
