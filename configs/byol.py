"""The repository's path to ``ssljax/configs/byol.py`` (its docstring is this module's).

``--config configs/byol.py:ARG`` loads the same config as ``--config byol:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.byol import *  # noqa: F401,F403
from ssljax.configs.byol import __doc__  # noqa: F401
