"""``textok serve``: a local web page to see what text buys (see docs/SERVE.md).

:class:`ServeApp` (``app.py``) holds the models and answers the page's requests; :func:`make_server`
(``server.py``) puts it behind Python's own HTTP server with one static page (``static/``), nothing fetched
from elsewhere; ``commands.py`` is the verb.
"""

from .app import ServeApp
from .server import make_server

__all__ = ["ServeApp", "make_server"]
