"""Models: transformer blocks, TexTok, and (as they land) TiTok, DiT, MaskGIT, discriminator, quantizers."""
