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

from .config import Config
from .errors import TextokError
from .models.dit import DiT, DiTConfig
from .models.imagefolder import ImageFolder, ImageFolderConfig
from .models.maskgit import MaskGIT, MaskGITConfig
from .models.registry import load_generator, load_tokenizer
from .models.textok import TexTok, TexTokConfig
from .models.titok import TiTok, TiTokConfig
from .models.var import VAR, VARConfig
from .text.embeddings import TextEmbeddings
from .version import __version__

__all__ = ["Config", "DiT", "DiTConfig", "ImageFolder", "ImageFolderConfig", "MaskGIT", "MaskGITConfig", "TexTok",
           "TexTokConfig", "TextEmbeddings", "TextokError", "TiTok", "TiTokConfig", "VAR", "VARConfig", "__version__",
           "load_generator", "load_tokenizer"]
