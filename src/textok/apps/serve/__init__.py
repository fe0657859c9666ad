"""``textok serve``: a local web page to see what text buys (see docs/SERVE.md).

:class:`ServeApp` (``app.py``) holds the models and answers the page's requests; :func:`make_server`
(``server.py``) puts it behind FastAPI + uvicorn with one static page (``static/``), nothing fetched from
elsewhere; ``guard.py`` decides who may talk to it and how much; ``commands.py`` is the verb.
"""

from .app import ServeApp
from .server import make_server

__all__ = ["ServeApp", "make_server"]
