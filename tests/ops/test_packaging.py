"""Packaging: the dependency locks, the install paths that use them, the sdist and the licence."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])


class Pin:
    def __init__(self, name: str, version: str, marker: str | None, hashes: list[str]) -> None:
        self.name = canonicalize_name(name)
        self.version = Version(version)
        self.marker = Marker(marker) if marker else None
        self.hashes = hashes


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a `uv pip compile --generate-hashes` file (backslash-continued lines)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        spec = line.split("--hash", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)\s*(?:;\s*(.+))?", spec)
        assert m, f"{path.name}: not an exact pin: {line[:80]}"
        pin = Pin(m[1], m[2], m[3], hashes)
        assert pin.name not in pins, f"{path.name}: {pin.name} pinned twice"
        pins[pin.name] = pin
    return pins


def requirements_of(extras: set[str]) -> list[Requirement]:
    """pyproject's requirements for these extras, self-references (iot-gateway[sim]) expanded."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


BUILD_REQUIRES = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
ALL_EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
LOCK_EXTRAS = {"runtime.lock": set(), "sim.lock": {"sim"}, "test.lock": ALL_EXTRAS}
# Environments the locks must install on: Pi OS 32-bit and 64-bit, x86_64 Debian, Python 3.11+.
LINUX = [
    {"platform_machine": machine, "python_version": py, "python_full_version": py + ".0"}
    for machine in ("x86_64", "aarch64", "armv7l")
    for py in ("3.11", "3.12", "3.13")
]


@pytest.mark.parametrize("lock_name", sorted(LOCK_EXTRAS))
def test_lock_pins_satisfy_pyproject(lock_name: str) -> None:
    pins = read_lock(LOCKS / lock_name)
    for req in requirements_of(LOCK_EXTRAS[lock_name]) + BUILD_REQUIRES:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock_name}: {req} is not locked: run sh scripts/lock.sh"
        assert req.specifier.contains(pins[name].version, prereleases=True), (
            f"{lock_name}: {name}=={pins[name].version} does not satisfy {req}: "
            "run sh scripts/lock.sh"
        )


@pytest.mark.parametrize("lock_name", sorted(LOCK_EXTRAS))
def test_lock_is_hashed_and_installs_everywhere(lock_name: str) -> None:
    text = (LOCKS / lock_name).read_text()
    assert "sh scripts/lock.sh" in text.splitlines()[1]  # made by the documented command
    pins = read_lock(LOCKS / lock_name)
    for pin in pins.values():
        assert pin.hashes and len(pin.hashes) == len(set(pin.hashes)), pin.name
    # Every file of a release is hashed, not just this machine's wheel: PyYAML, for one, has
    # wheels for x86_64 and aarch64 and an sdist for armv7.
    assert len(pins["pyyaml"].hashes) > 10
    # Nothing a Linux install needs is left out by a marker (universal, not this machine's).
    for env in LINUX:
        for req in requirements_of(LOCK_EXTRAS[lock_name]):
            if req.marker is None or req.marker.evaluate(env):
                pin = pins[canonicalize_name(req.name)]
                assert pin.marker is None or pin.marker.evaluate(env), (lock_name, pin.name, env)


def test_locks_agree() -> None:
    locks = {name: read_lock(LOCKS / name) for name in LOCK_EXTRAS}
    test = locks["test.lock"]
    for name, pins in locks.items():
        for pin in pins.values():
            assert pin.name in test, f"{name}: {pin.name} missing from test.lock"
            assert (pin.version, sorted(pin.hashes)) == (
                test[pin.name].version,
                sorted(test[pin.name].hashes),
            ), f"{name} and test.lock disagree on {pin.name}: run sh scripts/lock.sh"
    assert set(locks["runtime.lock"]) <= set(locks["sim.lock"]) <= set(test)


def test_lock_tool_is_pinned() -> None:
    pins = read_lock(LOCKS / "lock-tool.txt")
    assert list(pins) == ["uv"] and len(pins["uv"].hashes) > 5
    script = (ROOT / "scripts" / "lock.sh").read_text()
    for option in ("--universal", "--generate-hashes", "--require-hashes", "--python-version"):
        assert option in script
    requires_python = PYPROJECT["project"]["requires-python"]
    assert f"PYTHON_VERSION={requires_python.removeprefix('>=')}" in script


def test_install_paths_use_the_locks() -> None:
    install = (ROOT / "systemd" / "install.sh").read_text()
    assert 'LOCK="$SRC/requirements/runtime.lock"' in install
    assert re.search(r'--require-hashes -r "\$LOCK"', install)
    assert "--no-deps --no-build-isolation" in install
    for script, lock in (("test.sh", "test.lock"), ("demo.sh", "sim.lock")):
        text = (ROOT / "scripts" / script).read_text()
        assert f"--require-hashes -r requirements/{lock}" in text, script
        assert "--no-deps --no-build-isolation -e ." in text, script
        # Every install is from a lock: no pip line resolves on its own.
        for line in text.splitlines():
            if "pip install" in line:
                assert "--require-hashes" in line or "--no-deps" in line, line
    assert "sh scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_dockerfile_builds_without_buildkit_from_pinned_parts() -> None:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines()]
    # A parser directive would make the classic builder's BuildKit counterpart pull a frontend.
    assert not any(re.match(r"#\s*syntax\s*=", ln, re.I) for ln in text.splitlines())
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    for ln in instructions:
        assert "--mount" not in ln and "--platform" not in ln, ln
        assert not re.search(r"\$\{?(TARGET|BUILD)(ARCH|PLATFORM|OS|VARIANT)", ln), ln
        assert not ln.upper().startswith(("RUN <<", "COPY <<", "COPY --link", "ADD --link")), ln
    froms = [ln.split()[1] for ln in instructions if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2 and len(set(froms)) == 1
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", froms[0])
    runs = " ".join(ln for ln in instructions if ln.upper().startswith("RUN "))
    assert "pip install --require-hashes -r requirements/runtime.lock" in runs
    assert "pip install --no-deps --no-build-isolation ." in runs
    assert "dpkg --print-architecture" in runs
    copies = [ln for ln in instructions if ln.upper().startswith("COPY ")]
    assert any("requirements/runtime.lock" in ln for ln in copies)
    assert any("LICENSE" in ln for ln in copies)


def test_licence() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License")
    assert "iot-gateway contributors" in licence
    (setuptools,) = BUILD_REQUIRES
    # 77 is the first setuptools that reads SPDX `license` and `license-files` (PEP 639).
    assert setuptools.name == "setuptools" and not setuptools.specifier.contains("76.9")
    assert setuptools.specifier.contains("77.0")


DOT_SHIPPED = {".ci", ".dockerignore"}


def build_sdist(out: Path) -> tuple[Path, str]:
    """Build the sdist with the setuptools installed here, as pip's build would."""
    code = "import sys, setuptools.build_meta as b; print('SDIST=' + b.build_sdist(sys.argv[1]))"
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    name = re.search(r"^SDIST=(.+)$", result.stdout, re.M)
    assert name, result.stdout
    return out / name[1], result.stdout + result.stderr


def test_sdist_carries_the_source_tree(tmp_path: Path) -> None:
    sdist, output = build_sdist(tmp_path)
    # No licence deprecation, no manifest pattern matching nothing: a build says nothing.
    assert not re.search(r"warning|deprecat", output, re.I), output
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        names = {m.name.removeprefix(top + "/") for m in tar.getmembers() if m.isfile()}
    for needed in (
        "LICENSE",
        "README.md",
        "requirements/runtime.lock",
        "requirements/test.lock",
        "scripts/test.sh",
        "scripts/lock.sh",
        "systemd/install.sh",
        "Dockerfile",
        "deploy/gateway.yaml",
        "docs/operations.md",
        "config/schema.json",
        "bench/__main__.py",
        "tests/ops/test_packaging.py",
    ):
        assert needed in names, needed
    assert not any("__pycache__" in n or n.endswith(".pyc") or "node_modules" in n for n in names)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.decode()

    # Files tracked by git but absent from the checkout (deleted, not yet committed) don't
    # count, nor hidden top-level entries other than .ci and .dockerignore (git's own, tools').
    def shipped(name: str) -> bool:
        top = name.split("/", 1)[0]
        return (ROOT / name).is_file() and (not top.startswith(".") or top in DOT_SHIPPED)

    missing = {n for n in tracked.split("\0") if n and shipped(n)} - names
    assert not missing, f"add these file types to MANIFEST.in: {sorted(missing)}"


@pytest.mark.slow
def test_install_script_stages_a_working_install(tmp_path: Path) -> None:
    """install.sh for real, staged under a directory: venv from the lock, config, unit."""
    root = tmp_path / "root"
    result = subprocess.run(
        ["sh", str(ROOT / "systemd" / "install.sh"), "--root", str(root), "--no-build-deps"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    venv = root / "opt" / "iot-gateway" / "venv"
    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    installed = {canonicalize_name(d["name"]): Version(d["version"]) for d in json.loads(listing)}
    env = {"platform_machine": os.uname().machine, "sys_platform": sys.platform}
    for pin in read_lock(LOCKS / "runtime.lock").values():
        if pin.marker is None or pin.marker.evaluate(env):
            assert installed.get(pin.name) == pin.version, pin.name
    assert PROJECT in installed
    assert (root / "etc" / "iot-gateway" / "gateway.yaml").is_file()
    assert (root / "etc" / "systemd" / "system" / "iot-gateway.service").is_file()
    link = root / "usr" / "local" / "bin" / "iot-gateway"
    assert os.readlink(link) == "/opt/iot-gateway/venv/bin/iot-gateway"
    version = subprocess.run(
        [str(venv / "bin" / "iot-gateway"), "version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "iot-gateway" in version.stdout


@pytest.mark.parametrize(
    ("arch", "compiler"), [("armhf", True), ("arm64", False), ("amd64", False)]
)
def test_install_script_brings_a_compiler_only_where_wheels_are_missing(
    tmp_path: Path, arch: str, compiler: bool
) -> None:
    # A dpkg that reports another architecture; --dry-run prints the steps without doing them.
    fake = tmp_path / "dpkg"
    fake.write_text(f"#!/bin/sh\necho {arch}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        ["sh", str(ROOT / "systemd" / "install.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    ).stdout
    wants = "apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev libyaml-dev"
    assert (wants in out) is compiler, out
    # The compiler comes before the lock is installed.
    if compiler:
        assert out.index(wants) < out.index("--require-hashes")
