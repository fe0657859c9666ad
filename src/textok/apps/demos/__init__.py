"""The demos, each a few minutes on two CPU cores over the embedded captioned scenes.

* ``textok demo`` (:mod:`.tokenizers`): TexTok and the no-text baseline, trained with the same budget and compared;
* ``textok demo-gen`` (:mod:`.generation`): a class-conditional DiT over the demo TexTok's tokens;
* ``textok demo-titok`` (:mod:`.titok`): the TiTok baseline, a VQ tokenizer and a MaskGIT over its codes.
"""
