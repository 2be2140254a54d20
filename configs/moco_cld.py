"""The repository's path to ``ssljax/configs/moco_cld.py`` (its docstring is this module's).

``--config configs/moco_cld.py:ARG`` loads the same config as ``--config moco_cld:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.moco_cld import *  # noqa: F401,F403
from ssljax.configs.moco_cld import __doc__  # noqa: F401
