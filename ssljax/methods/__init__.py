"""Self-supervised methods as records of pure functions, and their registry.

Importing this package registers every built-in method (one module per method below).
"""

from ssljax.methods.base import (Method, RunInfo, build_method, keep_state,
                                 online_encoder_variables, register, registered_methods)
from ssljax.methods import simclr  # noqa: F401  (registers 'simclr')
from ssljax.methods import barlow_twins  # noqa: F401  (registers 'barlow_twins')
from ssljax.methods import swav  # noqa: F401  (registers 'swav')
from ssljax.methods import byol  # noqa: F401  (registers 'byol')
from ssljax.methods import dino  # noqa: F401  (registers 'dino')
from ssljax.methods import moco  # noqa: F401  (registers 'moco')
from ssljax.methods import npid  # noqa: F401  (registers 'npid')
