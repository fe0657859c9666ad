"""``textok serve``: a local web page to see what text buys (see README, "The web page").

:class:`ServeApp` (``app.py``) holds the models and answers the page's requests; :func:`make_server`
(``server.py``) puts it behind Python's own HTTP server with one static page (``static/``), nothing fetched
from elsewhere. Imported lazily, so ``textok --help`` does not load torch for this verb.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeApp", "make_server"]


def __getattr__(name: str) -> Any:
    if name == "ServeApp":
        from .app import ServeApp

        return ServeApp
    if name == "make_server":
        from .server import make_server

        return make_server
    raise AttributeError(name)
