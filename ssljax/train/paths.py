"""Workdir paths: local directories and cloud buckets (``gs://``, ``s3://``) through one API.

Everything a run writes into its workdir (checkpoints, ``config.json``, ``metrics.jsonl``,
``results.json``, plots) goes through `etils.epath`, the path library orbax itself uses, so a
``--workdir gs://bucket/run`` reaches the bucket and a local workdir the local disk by the same
code. Local paths are made absolute (orbax requires it). Bucket paths need their filesystem
package (``gcsfs`` for ``gs://``, or TensorFlow's ``tf.io.gfile``); `workdir_path` checks it
first and names the package to install, then `check_reachable` asks the store for the path once
per process, within ``$SSLJAX_BUCKET_TIMEOUT`` seconds, so that a bucket this host cannot reach
(no network, no credentials) ends the run with a message saying what to check, not after the
filesystem's own retries (about 100 s of them in gcsfs) with a connection error.

Object stores cannot append to a file: `append_text` rewrites the whole object there (the
metrics file is small: one line per logged step), and appends in place on a local disk.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading

from etils import epath

# Filesystem packages that epath can use for a scheme, in the order it tries them.
_PACKAGES = {"gs": ("gcsfs", "tensorflow"), "s3": ("s3fs", "tensorflow")}

BUCKET_TIMEOUT_ENV = "SSLJAX_BUCKET_TIMEOUT"
# Seconds `check_reachable` waits for the store's first answer. A metadata request to Cloud
# Storage takes well under a second; gcsfs retries a refused connection for about 100 s before
# it gives up, so the deadline is what bounds the wait.
DEFAULT_BUCKET_TIMEOUT_S = 60.0
MAX_BUCKET_TIMEOUT_S = 86400.0  # a day: beyond it the wait is a hang by another name
_REACHED: set[str] = set()  # bucket paths that answered in this process


class BucketPathError(ValueError):
  """A bucket path (``gs://``) that cannot be used here: an unknown scheme, its filesystem
  package is missing, or the store does not answer (`check_reachable`)."""


class WorkdirError(BucketPathError):
  """The workdir cannot be used (e.g. a bucket path without its filesystem package, or one
  whose store does not answer)."""


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


def bucket_timeout_s() -> float:
  """``$SSLJAX_BUCKET_TIMEOUT`` (seconds, finite, in (0, `MAX_BUCKET_TIMEOUT_S`]), else
  `DEFAULT_BUCKET_TIMEOUT_S`."""
  text = os.environ.get(BUCKET_TIMEOUT_ENV, "").strip()
  if not text:
    return DEFAULT_BUCKET_TIMEOUT_S
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not (math.isfinite(value) and 0 < value <= MAX_BUCKET_TIMEOUT_S):
    raise BucketPathError(f"{BUCKET_TIMEOUT_ENV}={text!r}: give the seconds to wait for a "
                          f"bucket's first answer as a positive number up to "
                          f"{MAX_BUCKET_TIMEOUT_S:.0f} (default {DEFAULT_BUCKET_TIMEOUT_S:.0f})")
  return value


# What to check when a store does not answer, by scheme.
_CREDENTIALS = {
    "gs": ("on a Cloud TPU or GCE VM a service account with storage access; elsewhere `gcloud "
           "auth application-default login`"),
    "s3": "the AWS credentials: `aws configure`, the environment, or the instance's role",
}


def _endpoint(kind: str) -> str:
  """Where requests for `kind`:// go, for the messages of `check_reachable`."""
  if kind == "gs" and os.environ.get("STORAGE_EMULATOR_HOST"):
    return f"the emulator at STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']}"
  return {"gs": "Cloud Storage (storage.googleapis.com)", "s3": "S3"}.get(kind, f"{kind}://")


def check_reachable(path: str | os.PathLike, what: str,
                    error: type[BucketPathError] = BucketPathError,
                    timeout_s: float | None = None) -> None:
  """Raises `error` unless bucket `path` answers a listing within `timeout_s` seconds.

  A path that does not exist yet is fine (a new workdir); what fails is a store that cannot
  be reached or refuses this host (network, credentials, a misspelt emulator address). The
  request runs in a daemon thread, so a filesystem that keeps retrying cannot hold the run
  past the deadline. Each path is asked once per process; local paths are not asked. (The
  abandoned thread goes on retrying until the process exits; the gcsfs one leaves a clean exit,
  tested. One stuck inside a C++ call, as with TensorFlow's tf.io.gfile, may turn that exit
  into an abort, after the message has been printed.)

  Args:
    path: ``gs://bucket/...``; local paths return at once.
    what: the setting that holds the path, for the message (``--workdir``).
    error: the exception class to raise.
    timeout_s: seconds to wait; None reads `bucket_timeout_s`.
  """
  text = os.fspath(path)
  kind = scheme(text)
  if kind is None or text in _REACHED:
    return
  timeout_s = bucket_timeout_s() if timeout_s is None else timeout_s
  outcome: dict[str, BaseException] = {}

  def ask() -> None:
    try:
      epath.Path(text).exists()
    except BaseException as e:  # pylint: disable=broad-except  (reported by the caller)
      outcome["error"] = e

  thread = threading.Thread(target=ask, name=f"ssljax-probe-{kind}", daemon=True)
  thread.start()
  thread.join(timeout_s)
  checks = (f"check that this host can reach it, that it has credentials "
            f"({_CREDENTIALS.get(kind, 'see the filesystem package')}), and that the bucket "
            f"name is right")
  if thread.is_alive():
    raise error(f"{what} {text!r}: no answer from {_endpoint(kind)} within {timeout_s:g} s; "
                f"{checks}. On a slow network raise {BUCKET_TIMEOUT_ENV} (seconds).")
  if "error" in outcome:
    cause = outcome["error"]
    raise error(f"{what} {text!r} cannot be read from {_endpoint(kind)} "
                f"({type(cause).__name__}: {str(cause)[:300]}); {checks}.") from cause
  _REACHED.add(text)


def workdir_path(workdir: str | os.PathLike, what: str = "--workdir") -> epath.Path:
  """`workdir` as an `epath.Path`: absolute if local; a bucket is checked for its package and
  then (once per process) for an answer within the deadline (`check_reachable`); `what`
  names the setting in the messages (``--out`` for an export directory).

  Raises:
    WorkdirError: a scheme epath does not know, its filesystem package is missing, or the
      bucket does not answer.
  """
  if is_local(workdir):
    return epath.Path(os.path.abspath(os.fspath(workdir)))
  check_bucket(workdir, what, WorkdirError)
  check_reachable(workdir, what, WorkdirError)
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
