"""The repository's path to ``ssljax/configs/npid_cld.py`` (its docstring is this module's).

``--config configs/npid_cld.py:ARG`` loads the same config as ``--config npid_cld:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.npid_cld import *  # noqa: F401,F403
from ssljax.configs.npid_cld import __doc__  # noqa: F401
