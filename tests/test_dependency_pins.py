"""The installed packages satisfy pyproject.toml's pins, so a drift from the tested releases is caught here."""

import os
import re
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dependencies() -> list[Requirement]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed metadata of pad_moe holds the same list
        from importlib.metadata import requires

        return [Requirement(r) for r in requires("pad_moe") or () if "extra ==" not in r]
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


DEPENDENCIES = _dependencies()


@pytest.mark.parametrize("pin", ["deepspeed>=0.19.8,<0.20", "transformers>=5.24,<5.25", "torch>=2.4"])
def test_the_code_s_dependencies_are_pinned_to_the_tested_series(pin):
    want = Requirement(pin)
    pins = {r.name: r.specifier for r in DEPENDENCIES}
    assert set(pins.get(want.name, ())) == set(want.specifier), f"pyproject.toml pins {want.name}{pins.get(want.name)}"


@pytest.mark.parametrize("requirement", DEPENDENCIES, ids=lambda r: r.name)
def test_the_installed_version_satisfies_the_pin(requirement):
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        pytest.fail(f"{requirement.name} is not installed; pyproject.toml requires {requirement}")
    public = re.sub(r"\+.*$", "", installed)  # torch's local label (+cpu) is no part of the release
    assert requirement.specifier.contains(public, prereleases=True), (
        f"installed {requirement.name} {installed} does not satisfy pyproject.toml's {requirement}")


def test_installing_the_package_prints_nothing():
    """A fresh machine's `pip install -q` printed setuptools' project.license deprecation wall (a table, not SPDX)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                           "-q", "-e", ROOT], capture_output=True, text=True, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if "license" in line.lower()
             or "deprecat" in line.lower()]
    assert not noise, noise[:5]
