"""Applications built on the library: the demos (:mod:`.demos`), the study of the paper's claims
(:mod:`.study`) and the web page of ``textok serve`` (:mod:`.serve`).

They sit above models/text/data/train/eval and use only their public pieces; each carries its own verbs
(``commands.py``), and ``textok.cli`` sits above them.
"""
