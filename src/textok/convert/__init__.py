"""Published checkpoints of other projects -> textok model directories that every verb loads.

``convert(fmt, source, out)`` reads a released file without running code from it (:mod:`.checkpoint`),
checks its key names and shapes against the committed manifest of the official layout (:mod:`.manifest`),
maps it onto a textok model (one module per source: :mod:`.titok`) and writes it with ``save_pretrained``.
"""

from .formats import FORMATS, Format
from .manifest import Variant, load_manifest
from .pipeline import Converted, convert

__all__ = ["FORMATS", "Converted", "Format", "Variant", "convert", "load_manifest"]
