"""Self-supervised methods as records of pure functions in stages, and their registries.

Importing this package registers every built-in method, one module each: simclr, moco, byol,
swav, barlow_twins, npid, dino, metamask; and the add-ons: uota, cld. ``ssljax.methods.base``
describes the record and its stages, ``ssljax.methods.addons`` how add-ons wrap them.
The module ``issl`` registers two methods, cissl and dissl.
"""

from ssljax.methods import (barlow_twins, byol, dino, metamask, moco, npid,  # registers
                            simclr, swav)
from ssljax.methods import issl  # registers cissl and dissl
from ssljax.methods import cld, uota  # register the add-ons (after the methods they wrap)
from ssljax.methods.base import (Method, Objective, Outputs, ParamGroup, RunInfo, build_method,
                                 keep_state, method_from_loss, online_encoder_variables,
                                 reduce_terms, register, register_addon, registered_addons,
                                 registered_methods)

__all__ = ["Method", "Objective", "Outputs", "ParamGroup", "RunInfo", "build_method",
           "keep_state", "method_from_loss", "online_encoder_variables", "reduce_terms",
           "register", "register_addon", "registered_addons", "registered_methods",
           "barlow_twins", "byol", "dino", "metamask", "moco", "npid", "simclr", "swav", "uota",
           "cld", "issl"]
