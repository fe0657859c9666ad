"""textok: text-conditioned image tokenization (TexTok) and generation.

>>> from textok import TexTok, TexTokConfig
>>> tok = TexTok(TexTokConfig.preset("textok-tiny"))
"""

from .config import Config
from .errors import TextokError
from .models.textok import TexTok, TexTokConfig
from .text.embeddings import TextEmbeddings
from .version import __version__

__all__ = ["Config", "TextokError", "TexTok", "TexTokConfig", "TextEmbeddings", "__version__"]
