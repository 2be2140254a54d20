"""The repository's path to ``ssljax/configs/swav.py`` (its docstring is this module's).

``--config configs/swav.py:ARG`` loads the same config as ``--config swav:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.swav import *  # noqa: F401,F403
from ssljax.configs.swav import __doc__  # noqa: F401
