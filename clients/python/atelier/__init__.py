"""Atelier Python SDK: ``atelier.Client`` and friends.

``atelier`` is shared by two distributions (this SDK and the server); both
``__init__`` files extend ``__path__`` the pkgutil way.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from atelier.sdk import *  # noqa: E402,F401,F403
