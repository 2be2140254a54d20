"""The repository's path to ``ssljax/configs/byol_cld.py`` (its docstring is this module's).

``--config configs/byol_cld.py:ARG`` loads the same config as ``--config byol_cld:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.byol_cld import *  # noqa: F401,F403
from ssljax.configs.byol_cld import __doc__  # noqa: F401
