"""The packaging metadata agrees with itself and with Colab's runtime that CI rebuilds."""

import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import optax_gradvac

ROOT = pathlib.Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COLAB = ROOT / ".ci" / "colab"
CORE = {"jax", "jaxlib", "optax", "numpy", "flax"}  # flax: the `flax` extra


def _requirements() -> list[Requirement]:
  """Every requirement pyproject.toml names, optional ones included, but the project's own."""
  texts = [
    *PYPROJECT["project"]["dependencies"],
    *(text for group in PYPROJECT["project"]["optional-dependencies"].values() for text in group),
  ]
  requirements = [Requirement(text) for text in texts]
  return [r for r in requirements if canonicalize_name(r.name) != "optax-gradvac"]


def _lower_bounds() -> dict[str, Version]:
  bounds = {}
  for requirement in _requirements():
    name = canonicalize_name(requirement.name)
    lower = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert len(lower) == 1, f"{requirement} needs exactly one lower bound"
    assert bounds.get(name, lower[0]) == lower[0], f"{name} has two lower bounds"
    bounds[name] = lower[0]
  return bounds


def _pins(path: pathlib.Path) -> dict[str, Version]:
  """The ``name==version`` lines of a pip freeze or constraints file."""
  pins = {}
  for line in path.read_text().splitlines():
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
    if match:
      pins[canonicalize_name(match[1])] = Version(match[2])
  return pins


def test_the_floors_of_the_core_are_colabs_versions():
  """jax, jaxlib, optax, numpy and flax: installing on Colab changes none, and CI tests them."""
  bounds, colab = _lower_bounds(), _pins(COLAB / "pip-freeze.txt")
  for name in CORE:
    assert bounds[name] == colab[name], f"{name}: floor {bounds[name]}, Colab ships {colab[name]}"


def test_no_floor_is_above_colabs_version():
  bounds, colab = _lower_bounds(), _pins(COLAB / "pip-freeze.txt")
  above = {
    name: (bound, colab[name]) for name, bound in bounds.items() if bound > colab.get(name, bound)
  }
  assert not above, f"floors above Colab's versions (floor, Colab's): {above}"


def test_the_floors_colab_lacks_are_tested_at_the_floor():
  bounds, colab, floors = (
    _lower_bounds(),
    _pins(COLAB / "pip-freeze.txt"),
    _pins(COLAB / "floors.txt"),
  )
  for name, version in floors.items():
    assert name not in colab, f"{name} is in Colab's runtime: its floor is tested there"
    assert bounds.get(name) == version, f"{name}: pinned {version}, floor {bounds.get(name)}"
  test_packages = {
    canonicalize_name(Requirement(t).name) for t in PYPROJECT["project"]["dependencies"]
  }
  assert not (test_packages - set(colab)), "a core dependency is missing from Colab's runtime"


def test_the_miscompiling_jaxlib_is_excluded():
  (jaxlib,) = [r for r in _requirements() if r.name == "jaxlib"]
  assert not jaxlib.specifier.contains("0.10.2")
  assert jaxlib.specifier.contains("0.10.1") and jaxlib.specifier.contains("0.11.2")


def test_the_package_names_its_homes():
  urls = PYPROJECT["project"]["urls"]
  assert {"Homepage", "Source", "Issues", "Documentation"} <= set(urls)
  assert urls["Issues"] == urls["Source"] + "/issues"
  python = Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier
  classifiers = PYPROJECT["project"]["classifiers"]
  for minor in (11, 12, 13):
    assert python.contains(f"3.{minor}")
    assert f"Programming Language :: Python :: 3.{minor}" in classifiers


def test_version_comes_from_the_package():
  assert "version" not in PYPROJECT["project"]
  assert "version" in PYPROJECT["project"]["dynamic"]
  attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "optax_gradvac.__version__"
  assert str(Version(optax_gradvac.__version__)) == optax_gradvac.__version__


def test_changelog_has_the_current_version_and_one_heading_of_each_kind():
  text = (ROOT / "CHANGELOG.md").read_text()
  releases = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
  names = [re.match(r"\[([^\]]+)\]", release)[1] for release in releases]
  assert names[0] == "Unreleased"
  assert optax_gradvac.__version__ in names
  for name, release in zip(names, releases, strict=True):
    kinds = re.findall(r"^### (\w+)", release, re.MULTILINE)
    assert len(kinds) == len(set(kinds)), f"{name}: repeated headings {kinds}"
    assert set(kinds) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_library_imports_without_its_extras():
  result = _run(
    "import sys, optax_gradvac\n"
    "extras = {'flax', 'matplotlib', 'scipy', 'wordfreq', 'tqdm'} & set(sys.modules)\n"
    "assert not extras, extras"
  )
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("function", ["to_bytes", "from_bytes"])
def test_serialisation_without_flax_names_the_extra(function):
  result = _run(
    "import sys; sys.modules['flax'] = None\n"
    "import optax_gradvac as ogv\n"
    f"ogv.{function}({{}}) if '{function}' == 'to_bytes' else ogv.{function}({{}}, b'')"
  )
  assert result.returncode != 0
  assert f"ImportError: {function} needs flax" in result.stderr
  assert "pip install 'optax_gradvac[flax]'" in result.stderr
