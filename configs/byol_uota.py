"""The repository's path to ``ssljax/configs/byol_uota.py`` (its docstring is this module's).

``--config configs/byol_uota.py:ARG`` loads the same config as ``--config byol_uota:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.byol_uota import *  # noqa: F401,F403
from ssljax.configs.byol_uota import __doc__  # noqa: F401
