"""``textok study``: the paper's TexTok-vs-baseline claims, measured, as one resumable command.

A grid of cells = token counts x text modes (``both``: text in encoder and decoder; ``encoder``; ``decoder``;
``none``: the no-text baseline), each a tokenizer trained with the same recipe, budget, seed and data and
evaluated on the held-out split (:mod:`.cells`); the claims judged from their numbers (:mod:`.claims`); C4, a
generator over the tokens of the best text cell and the no-text one (:mod:`.generation`); the report
(:mod:`.report`). :func:`run_study` runs it all from a :class:`StudySettings`; the caption embeddings are
cached once for all cells (``OUT/text_cache.safetensors``).

Writes ``OUT/report.md``, ``OUT/results.json``, ``OUT/plot_<metric>.png`` and ``OUT/grid.png``: the paper-style
table (no text vs text at each N and the relative gain), the mode ablation, and a verdict per claim.
"""

from .run import run_study
from .settings import GenerationSettings, StudySettings

__all__ = ["GenerationSettings", "StudySettings", "run_study"]
