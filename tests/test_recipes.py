"""Training recipes as the references train them: the loss scale of TiTok's stage 2, the ImageFolder recipe,
augmentation as a data setting (exact resume with it on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textok.train.config import load_train_config
from textok.train.tokenizer import generator_losses


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- TiTok stage 2: the reference's losses are on [0, 1] images ------------------------------------------
def test_titok_stage2_l2_is_the_references_mse_on_unit_range_images():
    """1d-tokenizer's stage 2 computes l2 (weight 1.0) on images in [0, 1]; textok's are in [-1, 1], so the
    recipe's l2 term must equal the reference's term on the same images mapped to [0, 1]."""
    cfg = load_train_config("titok-stage2", ["loss.perceptual=none", "loss.adversarial.weight=0"])
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    recon = (images + 0.3 * torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)).clamp(-1, 1)
    model = lambda x, text: (recon, {})  # noqa: E731  (a stand-in tokenizer that returns fixed reconstructions)
    _, terms, _ = generator_losses(model, None, None, images, None, cfg)
    reference = 1.0 * F.mse_loss((recon + 1) / 2, (images + 1) / 2)
    assert torch.allclose(terms["l2"].double(), reference, rtol=1e-6)
