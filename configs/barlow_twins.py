"""The repository's path to ``ssljax/configs/barlow_twins.py`` (its docstring is this module's).

``--config configs/barlow_twins.py:ARG`` loads the same config as ``--config barlow_twins:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.barlow_twins import *  # noqa: F401,F403
from ssljax.configs.barlow_twins import __doc__  # noqa: F401
