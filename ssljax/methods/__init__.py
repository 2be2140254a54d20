"""Self-supervised methods as records of pure functions, and their registry."""

from ssljax.methods.base import (Method, build_method, keep_state, online_encoder_variables,
                                 register, registered_methods)
from ssljax.methods import simclr  # noqa: F401  (registers 'simclr')

__all__ = ["Method", "build_method", "register", "registered_methods", "keep_state",
           "online_encoder_variables"]
