"""Data: the embedded captioned scenes, real image folders/tars with captions, and image I/O."""

from .folder import ImageCaptionFolder, collate
from .images import decode_image, load_image, save_image
from .scenes import CaptionedScenes

__all__ = ["CaptionedScenes", "ImageCaptionFolder", "collate", "decode_image", "load_image", "save_image"]
