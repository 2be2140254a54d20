"""The suite's scheduling list (tests/conftest.py) names files that exist."""

import os

from tests import conftest
from tests.util import REPO_ROOT


def test_every_file_scheduled_first_exists_once():
  paths = conftest._LONGEST_FILES_FIRST
  assert len(set(paths)) == len(paths)
  missing = [p for p in paths if not os.path.isfile(os.path.join(REPO_ROOT, p))]
  assert not missing, f"renamed or removed; update tests/conftest.py: {missing}"
