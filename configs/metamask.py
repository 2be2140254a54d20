"""The repository's path to ``ssljax/configs/metamask.py`` (its docstring is this module's).

``--config configs/metamask.py:ARG`` loads the same config as ``--config metamask:ARG``, which
works without the repository (pip install).
"""

from ssljax.configs.metamask import *  # noqa: F401,F403
from ssljax.configs.metamask import __doc__  # noqa: F401
