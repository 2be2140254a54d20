"""The repository's path to ``ssljax/configs/dissl.py`` (its docstring is this module's).

``--config configs/dissl.py:ARG`` loads the same config as ``--config dissl:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.dissl import *  # noqa: F401,F403
from ssljax.configs.dissl import __doc__  # noqa: F401
