"""Self-supervised methods as records of pure functions, and their registry.

Importing this package registers every built-in method, one module each: simclr, moco, byol,
swav, barlow_twins, npid, dino.
"""

from ssljax.methods import barlow_twins, byol, dino, moco, npid, simclr, swav  # registers
from ssljax.methods.base import (Method, RunInfo, build_method, keep_state,
                                 online_encoder_variables, register, registered_methods)

__all__ = ["Method", "RunInfo", "build_method", "register", "registered_methods", "keep_state",
           "online_encoder_variables", "barlow_twins", "byol", "dino", "moco", "npid", "simclr",
           "swav"]
