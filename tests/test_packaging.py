"""Packaging: setup.cfg and requirements.txt declare the same requirements, every third-party
module the package imports is declared, and the license file the metadata names ships."""

import ast
import configparser
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imported by ssljax only when present, for an optional feature (extras_require).
OPTIONAL_MODULES = {"tensorflow"}
# Top-level module -> the distribution that provides it, where the names differ.
DISTRIBUTIONS = {"absl": "absl-py", "PIL": "pillow", "orbax": "orbax-checkpoint",
                 "ml_collections": "ml-collections", "tensorflow_datasets": "tensorflow-datasets",
                 "tensorboardX": "tensorboardx"}


def _name(requirement: str) -> str:
  """The normalised distribution name of a requirement line (PEP 503)."""
  name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
  return re.sub(r"[-_.]+", "-", name).lower()


def _setup_cfg() -> configparser.ConfigParser:
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"), encoding="utf-8")
  return parser


def _lines(text: str) -> list[str]:
  """Requirement lines without comments and blanks."""
  return [line.split("#", 1)[0].strip() for line in text.splitlines()
          if line.split("#", 1)[0].strip()]


def _install_requires() -> dict[str, str]:
  return {_name(r): r.replace(" ", "")
          for r in _lines(_setup_cfg()["options"]["install_requires"])}


def _requirements_txt() -> dict[str, str]:
  with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
    return {_name(r): r.replace(" ", "") for r in _lines(f.read())}


def test_requirements_txt_is_setup_cfg_plus_the_test_extra():
  test_extra = {_name(r): r.replace(" ", "")
                for r in _lines(_setup_cfg()["options.extras_require"]["test"])}
  assert _requirements_txt() == {**_install_requires(), **test_extra}


def _imported_modules() -> set[str]:
  """Top-level modules that ssljax's source imports (module level or inside functions)."""
  found = set()
  for directory, _, files in os.walk(os.path.join(ROOT, "ssljax")):
    for file in files:
      if not file.endswith(".py"):
        continue
      with open(os.path.join(directory, file), encoding="utf-8") as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          found.add(node.module.split(".")[0])
  return found


def test_every_imported_third_party_module_is_declared():
  third_party = {m for m in _imported_modules()
                 if m not in sys.stdlib_module_names and m not in ("ssljax", "__future__")}
  assert "absl" in third_party and "PIL" in third_party  # the scan sees function-level imports
  declared = set(_install_requires())
  extras = {_name(r) for section in _setup_cfg()["options.extras_require"].values()
            for r in _lines(section)}
  for module in sorted(third_party):
    distribution = _name(DISTRIBUTIONS.get(module, module))
    if module in OPTIONAL_MODULES:
      assert distribution in extras, module
    else:
      assert distribution in declared, (module, distribution)


def test_the_license_file_named_by_the_metadata_ships():
  metadata = _setup_cfg()["metadata"]
  assert metadata["license"] == "Apache-2.0"
  path = os.path.join(ROOT, metadata["license_files"].strip())
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_the_package_cites_no_project_file_that_does_not_ship():
  # The method notes (SPEC.md, DECISIONS.md) stay with the project; a docstring in the package
  # names the paper section or the official code file instead.
  pattern = re.compile(r"\b(SPEC|DECISIONS|ANCHORS)\b")
  found = []
  for directory, _, files in os.walk(os.path.join(ROOT, "ssljax")):
    for file in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(directory, file)
      with open(path, encoding="utf-8") as f:
        found += [f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}"
                  for number, line in enumerate(f, 1) if pattern.search(line)]
  assert not found, "\n".join(found)
