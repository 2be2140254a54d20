"""The repository's path to ``ssljax/configs/simclr_uota.py`` (its docstring is this module's).

``--config configs/simclr_uota.py:ARG`` loads the same config as ``--config simclr_uota:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.simclr_uota import *  # noqa: F401,F403
from ssljax.configs.simclr_uota import __doc__  # noqa: F401
