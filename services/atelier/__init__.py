"""Atelier server package (a portion of the ``atelier`` namespace).

``atelier`` is shared by two distributions: the SDK (``clients/python``, which
also holds the generated protobuf stubs under ``atelier.v1``) and the server
(``services``). Both ``__init__`` files extend ``__path__`` the pkgutil way so
that either import order finds every portion.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

try:  # the SDK's public names, when the SDK portion is installed
    from atelier.sdk import *  # noqa: F401,F403
except ImportError:  # server-only install without the SDK portion
    pass
