"""requirements.lock, pyproject.toml and conda.yaml agree: the ranges people install into their own environment,
the exact versions the README and CI install, and the pins `mlflow run .` builds its conda environment with.

Fast: files only, no network, no install. When a test here fails, refresh the lock with the command in its
header (uv from PyPI: `pip install uv`), then copy its versions of the direct dependencies into conda.yaml.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pytest depends on tomli there, so the test extra brings it
    import tomli as tomllib

PROJECT = Path(__file__).resolve().parents[1]
LOCK = PROJECT / "requirements.lock"
PYPROJECT = PROJECT / "pyproject.toml"
CONDA = PROJECT / "conda.yaml"
CI = PROJECT / ".ci" / "run"

REFRESH = "uv pip compile pyproject.toml --extra test --universal --python-version 3.10 -o requirements.lock"
LOCKED_EXTRAS = ("test",)  # the lock holds [project].dependencies and these extras
PYTHONS = ("3.10.16", "3.11.7", "3.12.3")
MACHINES = ("x86_64", "aarch64")
# conda.yaml installs `tensorflow` on every machine; the lock gives x86_64 the CPU-only build of the same release.
CONDA_NAMES = {"tensorflow": ("tensorflow", "tensorflow-cpu")}


def environment(python: str, machine: str) -> dict[str, str]:
    """The marker environment of CPython `python` on Linux on `machine`, whatever machine this test runs on."""
    env = dict(default_environment())
    env.update(
        python_version=".".join(python.split(".")[:2]),
        python_full_version=python,
        implementation_name="cpython",
        implementation_version=python,
        platform_python_implementation="CPython",
        platform_machine=machine,
        platform_system="Linux",
        sys_platform="linux",
        os_name="posix",
        extra="",
    )
    return env


ENVIRONMENTS = {f"py{p.rsplit('.', 1)[0]}-{m}": environment(p, m) for p in PYTHONS for m in MACHINES}


def applies(req: Requirement, env: dict[str, str]) -> bool:
    return req.marker is None or req.marker.evaluate(env)


def read_lock(path: Path) -> tuple[list[Requirement], list[str]]:
    """The lock's requirements, and a problem for every line that is not an exact `name==version` pin."""
    pins, problems = [], []
    text = path.read_text().replace("\\\n", " ")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        line = " ".join(token for token in line.split() if not token.startswith("--hash="))
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            problems.append(f"line {number}: not a requirement: {raw.strip()!r}")
            continue
        specs = list(req.specifier)
        if req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"line {number}: not an exact == pin: {raw.strip()!r}")
            continue
        pins.append(req)
    return pins, problems


def lock_versions(pins: list[Requirement], env: dict[str, str]) -> tuple[dict[str, Version], list[str]]:
    """Name -> version of the pins that install in `env`, and a problem where two pins of one name both would."""
    versions, problems = {}, []
    for req in pins:
        if not applies(req, env):
            continue
        name = canonicalize_name(req.name)
        version = Version(next(iter(req.specifier)).version)
        if name in versions and versions[name] != version:
            problems.append(f"{name}: pinned to both {versions[name]} and {version}")
        versions[name] = version
    return versions, problems


def project_requirements(path: Path, extras: tuple[str, ...] = LOCKED_EXTRAS) -> list[Requirement]:
    project = tomllib.loads(path.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += optional[extra]
    return [Requirement(line) for line in lines]


def disagreements(pyproject: Path, lock: Path, environments: dict[str, dict[str, str]] = ENVIRONMENTS) -> list[str]:
    """Where the lock does not install what pyproject.toml asks for, or installs a direct dependency it does not."""
    pins, problems = read_lock(lock)
    wanted = project_requirements(pyproject)
    for label, env in environments.items():
        versions, clashes = lock_versions(pins, env)
        problems += [f"{label}: {clash}" for clash in clashes]
        asked = {canonicalize_name(req.name) for req in wanted if applies(req, env)}
        for req in wanted:
            name = canonicalize_name(req.name)
            if not applies(req, env):
                if name in versions and name not in asked:
                    problems.append(f"{label}: the lock installs {name}, which pyproject.toml asks for only where {req.marker}")
            elif name not in versions:
                problems.append(f"{label}: {req} is not in the lock")
            elif not req.specifier.contains(versions[name], prereleases=True):
                problems.append(f"{label}: the lock's {name}=={versions[name]} is outside pyproject.toml's {req}")
    return problems


def conda_pins(path: Path) -> tuple[str, dict[str, Requirement]]:
    """conda.yaml's Python version (major.minor) and its pip requirements by name."""
    dependencies = yaml.safe_load(path.read_text())["dependencies"]
    python = next(d.split("=", 1)[1] for d in dependencies if isinstance(d, str) and d.split("=")[0] == "python")
    pip = next(d["pip"] for d in dependencies if isinstance(d, dict) and "pip" in d)
    return python, {canonicalize_name(Requirement(line).name): Requirement(line) for line in pip}


def conda_disagreements(conda: Path, lock: Path, pyproject: Path) -> list[str]:
    """conda.yaml must pin every direct dependency of the job to the version the lock gives its Python."""
    python, pins = conda_pins(conda)
    lock_pins, problems = read_lock(lock)
    for name, req in pins.items():
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            problems.append(f"conda.yaml: {req} is not an exact == pin")
            continue
        for machine in MACHINES:
            env = environment(f"{python}.0", machine)
            versions, _ = lock_versions(lock_pins, env)
            locked = [versions[n] for n in CONDA_NAMES.get(name, (name,)) if n in versions]
            if not locked:
                problems.append(f"conda.yaml: {name} is not in the lock for Python {python} on {machine}")
            elif any(Version(specs[0].version) != version for version in locked):
                problems.append(f"conda.yaml: {req} but the lock gives Python {python} on {machine} {locked[0]}")
    direct = {canonicalize_name(req.name) for req in project_requirements(pyproject, extras=())}
    conda_names = {n for name in pins for n in CONDA_NAMES.get(name, (name,))}
    problems += [f"conda.yaml: pyproject.toml's {name} has no pin" for name in sorted(direct - conda_names)]
    return problems


# The real files.


def test_every_lock_line_is_an_exact_pin():
    pins, problems = read_lock(LOCK)
    assert not problems
    assert len(pins) > 100  # every transitive dependency, not only the direct ones


def test_lock_satisfies_pyproject_on_every_supported_python_and_machine():
    assert disagreements(PYPROJECT, LOCK) == []


def test_lock_keeps_tensorflow_apart_by_machine():
    pins, _ = read_lock(LOCK)
    for label, env in ENVIRONMENTS.items():
        versions, _ = lock_versions(pins, env)
        cpu = env["platform_machine"] == "x86_64"
        assert ("tensorflow-cpu" in versions, "tensorflow" in versions) == (cpu, not cpu), label


def test_lock_pins_no_torch_or_cuda():
    pins, _ = read_lock(LOCK)
    heavy = [req.name for req in pins if req.name.startswith(("torch", "nvidia-")) or "cuda" in req.name]
    assert heavy == []


def test_lock_header_gives_the_refresh_command():
    header = itertools.takewhile(lambda line: line.startswith("#"), LOCK.read_text().splitlines())
    assert any(line.lstrip("# ") == REFRESH for line in header)


def test_conda_pins_are_the_locks():
    assert conda_disagreements(CONDA, LOCK, PYPROJECT) == []


def test_ci_installs_from_the_lock():
    install = [line for line in CI.read_text().splitlines() if "pip install" in line]
    assert install and all("-r requirements.lock" in line for line in install)


# Broken copies in tmp_path: each check reports what it is there to catch.

PYPROJECT_TEXT = """
[project]
name = "demo"
dependencies = [
    "tensorflow-cpu>=2.16,<2.22; platform_machine == 'x86_64'",
    "tensorflow>=2.16,<2.22; platform_machine != 'x86_64'",
    "mlflow>=3.1,<4",
]
[project.optional-dependencies]
test = ["pytest>=8"]
"""
LOCK_TEXT = """\
# This file was autogenerated by uv via the following command:
mlflow==3.17.2
    # via demo (pyproject.toml)
pytest==9.2.0
tensorflow==2.21.0 ; platform_machine != 'x86_64'
tensorflow-cpu==2.21.0 ; platform_machine == 'x86_64'
"""
CONDA_TEXT = """\
dependencies:
  - python=3.11
  - pip
  - pip:
      - tensorflow==2.21.0
      - mlflow==3.17.2
"""


@pytest.fixture
def files(tmp_path):
    paths = {name: tmp_path / name for name in ("pyproject.toml", "requirements.lock", "conda.yaml")}
    for name, text in zip(paths, (PYPROJECT_TEXT, LOCK_TEXT, CONDA_TEXT)):
        paths[name].write_text(text)
    return paths


def break_file(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_an_agreeing_copy_passes(files):
    assert disagreements(files["pyproject.toml"], files["requirements.lock"]) == []
    assert conda_disagreements(files["conda.yaml"], files["requirements.lock"], files["pyproject.toml"]) == []


@pytest.mark.parametrize(
    "file, old, new, expected",
    [
        ("pyproject.toml", "mlflow>=3.1,<4", "mlflow>=4", "mlflow==3.17.2 is outside"),
        ("pyproject.toml", '"pytest>=8"', '"pytest>=8", "playwright>=1.40"', "playwright>=1.40 is not in the lock"),
        ("requirements.lock", "mlflow==3.17.2\n", "", "mlflow<4,>=3.1 is not in the lock"),
        ("requirements.lock", "pytest==9.2.0\n", "pytest==7.4.0\n", "pytest==7.4.0 is outside"),
        ("requirements.lock", "tensorflow-cpu==2.21.0 ; platform_machine == 'x86_64'", "tensorflow-cpu==2.21.0",
         "the lock installs tensorflow-cpu"),
        ("requirements.lock", "tensorflow==2.21.0 ; platform_machine != 'x86_64'", "tensorflow==2.21.0 ; python_version < '3'",
         "is not in the lock"),
        ("requirements.lock", "pytest==9.2.0", "pytest>=9", "not an exact == pin"),
        ("requirements.lock", "pytest==9.2.0", "pytest==9.*", "not an exact == pin"),
        ("requirements.lock", "pytest==9.2.0", "pytest==9.2.0\n-e .", "not a requirement"),
        ("requirements.lock", "pytest==9.2.0", "pytest==9.2.0\npytest==9.1.0 ; python_version >= '3.11'",
         "pinned to both"),
    ],
)
def test_a_disagreeing_pair_is_reported(files, file, old, new, expected):
    break_file(files[file], old, new)
    problems = disagreements(files["pyproject.toml"], files["requirements.lock"])
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    "file, old, new, expected",
    [
        ("conda.yaml", "mlflow==3.17.2", "mlflow==3.17.1", "mlflow==3.17.1 but the lock gives"),
        ("conda.yaml", "tensorflow==2.21.0", "tensorflow==2.20.0", "tensorflow==2.20.0 but the lock gives"),
        ("conda.yaml", "mlflow==3.17.2", "mlflow>=3.1,<4", "not an exact == pin"),
        ("conda.yaml", "      - mlflow==3.17.2\n", "", "mlflow has no pin"),
        ("conda.yaml", "mlflow==3.17.2", "mlflow==3.17.2\n      - flask==3.1.3", "flask is not in the lock"),
        ("requirements.lock", "tensorflow==2.21.0 ;", "tensorflow==2.20.0 ;", "the lock gives Python 3.11 on aarch64"),
    ],
)
def test_a_disagreeing_conda_env_is_reported(files, file, old, new, expected):
    break_file(files[file], old, new)
    problems = conda_disagreements(files["conda.yaml"], files["requirements.lock"], files["pyproject.toml"])
    assert any(expected in problem for problem in problems), problems
