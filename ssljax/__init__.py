"""ssljax: self-supervised visual representation learning in JAX/Flax.

``ssljax.load_encoder(DIR) -> (module, variables)`` loads an encoder written by ``ssljax
export`` (`ssljax.export`). The subpackages are imported on use, so ``import ssljax`` stays
light.
"""

from typing import Any


def __getattr__(name: str) -> Any:
  if name == "load_encoder":
    from ssljax.export import load_encoder
    return load_encoder
  raise AttributeError(f"module 'ssljax' has no attribute {name!r}")


__all__ = ["load_encoder"]
