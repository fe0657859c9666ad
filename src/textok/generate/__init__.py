"""Generation over tokenizer tokens: extract latents once, train a DiT or MaskGIT on them, sample and decode.

    extract_latents(tokenizer_dir, "scenes", "latents/")              # shards + captions + meta + caption bank
    train_generator(load_generator_config("dit-s", ["latents=latents/"]), "runs/gen")
    pipe = GenerationPipeline("runs/gen/final", tokenizer_dir)
    images = pipe.generate(labels=[0, 1, 2], steps=250, cfg_scale=4.0, seed=0)
"""

from .latents import LatentDataset, extract_latents, read_meta
from .sampling import GenerationPipeline, sample_grid, write_npz
from ..models.registry import load_generator
from .trainer import GeneratorTrainConfig, load_generator_config, train_generator

__all__ = [
    "extract_latents",
    "LatentDataset",
    "read_meta",
    "GeneratorTrainConfig",
    "load_generator_config",
    "train_generator",
    "load_generator",
    "GenerationPipeline",
    "sample_grid",
    "write_npz",
]
