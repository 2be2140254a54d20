"""The configs that ship with ssljax: one module per method, one per method + add-on.

Each module has ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``; for a
method's module (``simclr``, ``swav``, ...) the argument is the dataset (``fashion_mnist``,
``cifar10``, ``cifar100``, ``imagenet``), for an add-on's (``simclr_uota``, ``moco_cld``, ...)
one of its ``SETTINGS``. The module docstrings give the commands, hardware, time and accuracy.

``--config`` takes a config by name, so a ``pip install``ed ssljax needs no repository:

  ssljax train --config simclr:fashion_mnist --workdir runs/simclr   # NAME:ARG
  ssljax train --config simclr_fashion_mnist --workdir runs/simclr   # the same, NAME_ARG
  ssljax train --config simclr --workdir runs/simclr                 # the module's default

or by file, ``--config path/to/file.py[:ARG]``; the repository's ``configs/<name>.py`` files
re-export these modules, so ``configs/simclr.py:fashion_mnist`` loads the same config.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> tuple[str, ...]:
  """The shipped config names (the modules of this package), sorted."""
  return tuple(sorted(f[:-3] for f in os.listdir(_HERE)
                      if f.endswith(".py") and not f.startswith("_")))


def resolve(spec: str) -> str:
  """``--config`` text -> ``path[:arg]`` of the file to load.

  A spec whose path part (before the first ':') is an existing file is returned unchanged.
  Otherwise the path part is a config name: ``NAME[:ARG]`` for the module ``NAME`` of this
  package, or, without ':', ``NAME_ARG`` with ``NAME`` the longest shipped name that the text
  starts with followed by '_' (``simclr_uota_fashion_mnist`` is ``simclr_uota`` with
  ``fashion_mnist``).

  Raises:
    FileNotFoundError: neither a file nor a shipped name; the message lists the names.
  """
  path, has_arg, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  shipped = names()
  if path in shipped:
    return os.path.join(_HERE, f"{path}.py") + (f":{arg}" if has_arg else "")
  if not has_arg:
    prefixes = [name for name in shipped if path.startswith(f"{name}_")]
    if prefixes:
      name = max(prefixes, key=len)
      return os.path.join(_HERE, f"{name}.py") + ":" + path[len(name) + 1:]
  looks_like_a_file = path.endswith(".py") or os.sep in path
  raise FileNotFoundError(
      (f"config file {path!r} not found" if looks_like_a_file else
       f"{path!r} is neither a config file nor a shipped config name") +
      f"; shipped configs: {', '.join(shipped)} (use NAME:ARG, e.g. simclr:fashion_mnist, or "
      f"a file, e.g. configs/simclr.py:fashion_mnist from the repository root)")
