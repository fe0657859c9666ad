"""Models: transformer blocks (vit.py), the tokenizers (TexTok, TiTok, ImageFolder), the generators (DiT, MaskGIT,
VAR), the discriminator, quantizers and the frozen MaskGIT-VQGAN; registry.py maps names to classes."""
