"""AIGIS: the shared namespace of skills.

Inside the core process, every skill registered by a plugin appears here as ``aigis.<path>``.
AIGIS's own code lives in underscore-prefixed modules, so every other public name belongs to
skills or to this small API: ``RemoteError``, ``CoreUnavailable``, ``AigisError``, ``__version__``.
Importing this module has no side effects.
"""

from aigis._errors import AigisError, CoreUnavailable, RemoteError
from aigis._version import __version__

__all__ = ["AigisError", "CoreUnavailable", "RemoteError", "__version__"]
