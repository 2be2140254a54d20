"""The repository's path to ``ssljax/configs/swav_uota.py`` (its docstring is this module's).

``--config configs/swav_uota.py:ARG`` loads the same config as ``--config swav_uota:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.swav_uota import *  # noqa: F401,F403
from ssljax.configs.swav_uota import __doc__  # noqa: F401
