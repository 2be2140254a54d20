"""launch/local.sh: how it reacts when installing ssljax fails (no network or pip needed).

A stand-in interpreter passes the version check and fails `pip install` with a chosen message,
so the tests see which failures make the launcher fall back to a virtualenv (only PEP 668's
"externally managed" refusal) and which are reported as they are.
"""

import os
import shutil
import stat
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-c "*) exit 0 ;;                                   # the version check passes
  "-m pip") echo "$FAKE_PIP_ERROR" >&2; exit 1 ;;    # every install fails
  "-m venv") echo "fake venv refused" >&2; exit 1 ;;
esac
exit 3
"""


def _launch(tmp_path, pip_error: str) -> subprocess.CompletedProcess:
  fake = tmp_path / "python-fake"
  fake.write_text(_FAKE_PYTHON)
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
  env = {**os.environ, "PYTHON": str(fake), "FAKE_PIP_ERROR": pip_error,
         "TMPDIR": str(tmp_path)}
  return subprocess.run(["bash", os.path.join(_REPO, "launch", "local.sh"), "eval", "W"],
                        env=env, capture_output=True, text=True, timeout=60)


def test_a_failed_install_is_reported_not_mistaken_for_pep_668(tmp_path):
  result = _launch(tmp_path, "ERROR: Could not install packages due to an OSError: disk full")
  assert result.returncode != 0
  assert "disk full" in result.stderr
  assert "failed (see pip's message above)" in result.stderr
  assert "creating .venv" not in result.stderr


def test_an_externally_managed_python_gets_a_virtualenv(tmp_path):
  result = _launch(tmp_path, "error: externally-managed-environment")
  assert result.returncode != 0
  assert "does not accept pip installs (PEP 668); creating .venv" in result.stderr
  # The stand-in refuses `-m venv`, and the launcher says what to install.
  assert "could not create .venv: install python3-venv" in result.stderr
