"""The version of textok, recorded in every saved model's ``config.json``."""

__version__ = "0.1.0"
