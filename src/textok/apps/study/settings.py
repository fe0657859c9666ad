"""What a study runs: :class:`StudySettings` (the grid, its recipe and evaluation) and, for claim C4,
:class:`GenerationSettings` (the generator over the tokens of two cells)."""

from __future__ import annotations

import dataclasses
import math

from ...errors import ConfigError

MODES: dict[str, tuple[bool, bool]] = {  # text mode -> (text_in_encoder, text_in_decoder)
    "both": (True, True),
    "encoder": (True, False),
    "decoder": (False, True),
    "none": (False, False),
}
DEFAULT_TOKENS = (16, 32, 64, 128)
DEFAULT_GENERATOR_RECIPE = "study-dit"
DEFAULT_BOOTSTRAP = 200


@dataclasses.dataclass
class GenerationSettings:
    """What ``--generation`` runs: at which N, with which generator recipe, how many samples."""

    tokens: int | None = None  # None = the study's smallest token count
    recipe: str = DEFAULT_GENERATOR_RECIPE  # a generator recipe in textok/configs or a YAML GeneratorTrainConfig
    steps: int | None = None  # generator training steps (None = the recipe's)
    samples: int = 1000  # samples per seed = reference images (capped by the held-out split)
    seeds: tuple[int, ...] = (0, 1)
    sampling_steps: int = 50
    cfg_scale: float = 1.5  # DiT's FID-optimal guidance; the same for both tokenizers
    batch_size: int = 100
    condition: str = "auto"  # "class", "text" (prompt = each reference image's first caption), "auto": class if any

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"--gen-samples {self.samples}: need at least 2 samples for a Fréchet distance")
        if not self.seeds:
            raise ConfigError("--gen-seeds: give at least one sampling seed")
        if self.condition not in ("auto", "class", "text"):
            raise ConfigError(f"--gen-condition {self.condition!r}: choose auto, class or text")
        if self.cfg_scale < 1 or not math.isfinite(self.cfg_scale):
            raise ConfigError(f"--gen-cfg {self.cfg_scale} must be >= 1 (1 = no guidance)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--gen-steps {self.steps} must be positive")


@dataclasses.dataclass
class StudySettings:
    """A grid of cells (token counts x text modes) trained with one recipe, and how they are evaluated.

    ``None`` means "the recipe's" (data, steps, image size, held-out images, seed, FD input size).
    ``init_from_study``: every cell starts from the same cell of that finished study (a second training stage).
    ``eval_data``: train nothing; score the finished cells on the ``eval_split`` of another captioned set.
    ``bootstrap``: resamplings for the intervals that let a verdict be "undecided"; ``replicates``: finished
    studies of the same cells trained with other seeds, whose values join each comparison (the seed spread).
    """

    data: str | None = None  # "scenes" or a captioned folder/tar
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    modes: tuple[str, ...] = tuple(MODES)
    recipe: str | None = None  # default: study-scenes for the scenes, else study-flickr
    steps: int | None = None
    image_size: int | None = None
    val_num: int | None = None
    seed: int | None = None
    fd_size: int | None = None
    inception_weights: str | None = None
    vgg16_weights: str | None = None
    overrides: tuple[str, ...] = ()  # key=value training overrides shared by every cell
    generation: GenerationSettings | None = None  # claim C4
    init_from_study: str | None = None
    eval_data: str | None = None
    eval_split: str = "val"
    bootstrap: int = DEFAULT_BOOTSTRAP  # paired bootstrap resamplings of the evaluation images (0 = no intervals)
    replicates: tuple[str, ...] = ()  # finished studies of the same grid with other training seeds

    def __post_init__(self) -> None:
        self.tokens = tuple(sorted(dict.fromkeys(int(n) for n in self.tokens)))
        self.modes = tuple(dict.fromkeys(self.modes))
        self.overrides = tuple(self.overrides)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"unknown text mode(s) {', '.join(bad) or '(none given)'}: "
                              f"choose from {', '.join(MODES)}")
        if not self.tokens or min(self.tokens) < 1:
            raise ConfigError(f"token counts must be positive integers; got {list(self.tokens)}")
        self.replicates = tuple(self.replicates)
        if self.bootstrap < 0 or self.bootstrap == 1:
            raise ConfigError(f"--bootstrap {self.bootstrap}: give the number of resamplings (e.g. 200), or 0 for none")
        if self.eval_data is not None and self.generation is not None:
            raise ConfigError("--eval-data scores the trained cells on other images; it does not run C4: drop "
                              "--generation")


__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_TOKENS", "GenerationSettings", "MODES", "StudySettings"]
