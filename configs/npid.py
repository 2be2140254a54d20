"""The repository's path to ``ssljax/configs/npid.py`` (its docstring is this module's).

``--config configs/npid.py:ARG`` loads the same config as ``--config npid:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.npid import *  # noqa: F401,F403
from ssljax.configs.npid import __doc__  # noqa: F401
