"""Applications built on the library (the web page of ``textok serve``, ...).

They sit above models/text/data/train/eval and use only their public pieces; ``cli.py`` sits above them.
"""
