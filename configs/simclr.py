"""The repository's path to ``ssljax/configs/simclr.py`` (its docstring is this module's).

``--config configs/simclr.py:ARG`` loads the same config as ``--config simclr:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.simclr import *  # noqa: F401,F403
from ssljax.configs.simclr import __doc__  # noqa: F401
