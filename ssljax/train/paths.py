"""Workdir paths: local directories and cloud buckets (``gs://``, ``s3://``) through one API.

Everything a run writes into its workdir (checkpoints, ``config.json``, ``metrics.jsonl``,
``results.json``, plots) goes through `etils.epath`, the path library orbax itself uses, so a
``--workdir gs://bucket/run`` reaches the bucket and a local workdir the local disk by the same
code. Local paths are made absolute (orbax requires it). Bucket paths need their filesystem
package (``gcsfs`` for ``gs://``, or TensorFlow's ``tf.io.gfile``); `workdir_path` checks it
first and names the package to install.

Object stores cannot append to a file: `append_text` rewrites the whole object there (the
metrics file is small: one line per logged step), and appends in place on a local disk.
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath

# Filesystem packages that epath can use for a scheme, in the order it tries them.
_PACKAGES = {"gs": ("gcsfs", "tensorflow"), "s3": ("s3fs", "tensorflow")}


class BucketPathError(ValueError):
  """A bucket path (``gs://``) that cannot be used here: an unknown scheme, or its
  filesystem package is missing."""


class WorkdirError(BucketPathError):
  """The workdir cannot be used (e.g. a bucket path without its filesystem package)."""


def scheme(path: str | os.PathLike) -> str | None:
  """``'gs'`` for ``gs://bucket/x``; None for a local path."""
  text = os.fspath(path)
  return text.split("://", 1)[0] if "://" in text else None


def is_local(path: str | os.PathLike) -> bool:
  return scheme(path) is None


def check_bucket(path: str | os.PathLike, what: str,
                 error: type[BucketPathError] = BucketPathError) -> None:
  """Raises `error` if bucket `path` has a scheme epath does not know or its filesystem
  package is missing; `what` names the setting in the message (e.g. ``--workdir``)."""
  kind = scheme(path)
  if kind is None:
    return
  if kind not in _PACKAGES:
    raise error(f"{what} {os.fspath(path)!r}: unsupported scheme {kind}://; use a local "
                f"directory or {', '.join(s + '://' for s in _PACKAGES)}")
  if not any(importlib.util.find_spec(p) is not None for p in _PACKAGES[kind]):
    raise error(f"{what} {os.fspath(path)!r} needs the {kind}:// filesystem package: pip "
                f"install {_PACKAGES[kind][0]} (or install {_PACKAGES[kind][1]}, whose "
                f"tf.io.gfile epath also uses)")


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """`workdir` as an `epath.Path`: absolute if local, checked for its package if a bucket.

  Raises:
    WorkdirError: a scheme epath does not know, or its filesystem package is missing.
  """
  if is_local(workdir):
    return epath.Path(os.path.abspath(os.fspath(workdir)))
  check_bucket(workdir, "--workdir", WorkdirError)
  return epath.Path(os.fspath(workdir))


def append_text(path: epath.Path, text: str) -> None:
  """Appends `text` to `path` (created if absent); on object stores by rewriting it."""
  if is_local(path):
    with open(os.fspath(path), "a", encoding="utf-8") as f:
      f.write(text)
    return
  previous = path.read_text(encoding="utf-8") if path.exists() else ""
  path.write_text(previous + text, encoding="utf-8")


def replace_text(path: epath.Path, text: str) -> None:
  """Writes `text` to `path` in one step (a temporary file renamed over it, when local)."""
  if is_local(path):
    tmp = epath.Path(os.fspath(path) + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(os.fspath(tmp), os.fspath(path))
  else:  # an object is replaced whole by a write
    path.write_text(text, encoding="utf-8")
