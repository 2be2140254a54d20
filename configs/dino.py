"""The repository's path to ``ssljax/configs/dino.py`` (its docstring is this module's).

``--config configs/dino.py:ARG`` loads the same config as ``--config dino:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.dino import *  # noqa: F401,F403
from ssljax.configs.dino import __doc__  # noqa: F401
