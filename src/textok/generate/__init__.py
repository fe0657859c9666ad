"""Generation over tokenizer tokens: extract latents once (the generators' training data), then sample a trained
generator and decode its tokens with the tokenizer.

    extract_latents(tokenizer_dir, "scenes", "latents/")              # shards + captions + meta + caption bank
    # train a DiT or MaskGIT on them: textok.train.generator.train_generator (or `textok train-generator`)
    pipe = GenerationPipeline("runs/gen/final", tokenizer_dir)
    images = pipe.generate(labels=[0, 1, 2], steps=250, cfg_scale=4.0, seed=0)
"""

from .latents import LatentDataset, extract_latents, read_meta
from .sampling import GenerationPipeline, sample_grid, write_npz

__all__ = ["GenerationPipeline", "LatentDataset", "extract_latents", "read_meta", "sample_grid", "write_npz"]
