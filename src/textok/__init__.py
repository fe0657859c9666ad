"""textok: text-conditioned image tokenization (TexTok) and generation.

>>> from textok import TexTok, TexTokConfig
>>> tok = TexTok(TexTokConfig.preset("textok-tiny"))
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import TextokError  # noqa: E402
from .models.textok import TexTok, TexTokConfig  # noqa: E402
from .text.embeddings import TextEmbeddings  # noqa: E402

__all__ = ["Config", "TextokError", "TexTok", "TexTokConfig", "TextEmbeddings", "__version__"]
