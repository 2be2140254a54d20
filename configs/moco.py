"""The repository's path to ``ssljax/configs/moco.py`` (its docstring is this module's).

``--config configs/moco.py:ARG`` loads the same config as ``--config moco:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.moco import *  # noqa: F401,F403
from ssljax.configs.moco import __doc__  # noqa: F401
