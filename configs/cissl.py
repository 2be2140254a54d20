"""The repository's path to ``ssljax/configs/cissl.py`` (its docstring is this module's).

``--config configs/cissl.py:ARG`` loads the same config as ``--config cissl:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.cissl import *  # noqa: F401,F403
from ssljax.configs.cissl import __doc__  # noqa: F401
