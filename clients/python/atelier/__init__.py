"""Atelier Python SDK: ``atelier.Client`` and friends.

``atelier`` is shared by two distributions. Only this SDK ships ``atelier/__init__.py``
(it extends ``__path__`` the pkgutil way so the server's portion is found wherever it is
installed); the server (``atelier.core``, ``atelier.inversion``, ...) is a namespace
portion without one, so uninstalling the server leaves ``atelier.Client`` working.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from atelier.sdk import *  # noqa: E402,F401,F403
from atelier import aio  # noqa: E402,F401  (atelier.aio.Client after a plain `import atelier`)
