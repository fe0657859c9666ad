"""Text side: frozen encoders, per-token embeddings, an embedding cache, caption banks."""

from .banks import CaptionBank
from .cache import TextEmbeddingCache
from .embeddings import TextEmbeddings
from .encoders import DEFAULT_TEXT_ENCODER, HFTextEncoder, check_captions, load_text_encoder, text_dim

__all__ = [
    "CaptionBank",
    "TextEmbeddingCache",
    "TextEmbeddings",
    "DEFAULT_TEXT_ENCODER",
    "HFTextEncoder",
    "check_captions",
    "load_text_encoder",
    "text_dim",
]
