"""The wheelhouse: Patroni (etcd3) + psycopg2-binary and every dependency, for the hosts' Python.

Two passes under a CPython of the hosts' minor version (Debian 12: 3.11; default /usr/bin/python3),
isolated from this machine's pip configuration (PIP_CONFIG_FILE=/dev/null, no PIP_* variables; the
index is passed explicitly when one is configured, see sources.pip_index):
1. resolve: ``pip install --dry-run --report`` names every distribution pip picks, with the sha256
   of the file it downloaded; that becomes ``resolved.txt`` (every dependency ``==`` + ``--hash``);
2. build: ``pip wheel --require-hashes --no-deps -r resolved.txt``: nothing outside that list, and
   nothing whose hash differs from what was resolved. Source-only projects (python-etcd, ydiff)
   become pure wheels.
``requirements.txt`` pins every built wheel with ``--hash`` (hosts: ``--require-hashes``);
``check_offline`` proves the set installs with ``pip install --no-index --require-hashes`` into a
fresh venv and ``patroni --version`` runs. The built set (with its resolved.txt) is cached by the hash
of (requirements, python, index) so a rebuild is offline.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runbook.bundle.manifest import BundleError, sha256_file

PATRONI_VERSION = "4.1.5"  # the default of runbook.patroni_version
PSYCOPG2_VERSION = "2.9.13"


def requirements_for(patroni_version: str = PATRONI_VERSION) -> tuple[str, ...]:
    """The wheelhouse's top-level requirements for one Patroni release (runbook.patroni_version): a lab can
    build an older bundle and a newer one, e.g. to drill `inv cluster.update` from 4.1.4 to 4.1.5."""
    return (f"patroni[etcd3]=={patroni_version}", f"psycopg2-binary=={PSYCOPG2_VERSION}")


DEFAULT_REQUIREMENTS = requirements_for()
RESOLVED = "resolved.txt"
TARGET_PYTHON = (3, 11)  # Debian 12's; a target passes its own (runbook.inventory.distros)
TARGET_GLIBC = (2, 36)  # Debian 12
# A Python to run: a path on this machine, or a command prefix (["chroot", ROOT, "/usr/bin/python3"]: the
# target distribution's own Python in its base tree, for a target whose Python this machine lacks).
Python = str | Sequence[str]


def _cmd(python: Python) -> list[str]:
    return [python] if isinstance(python, str) else list(python)
WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<ver>[^-]+)(?:-\d[^-]*)?"
                      r"-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


@dataclass(frozen=True)
class Wheel:
    name: str  # canonical project name (PEP 503)
    version: str
    path: Path
    sha256: str
    built_from_sdist: bool


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus PIP_* and the pip config files (global find-links etc.)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


def _python_version(python: Python) -> tuple[int, int]:
    try:
        out = subprocess.run([*_cmd(python), "-c", "import sys; print(*sys.version_info[:2])"], check=True,
                             capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BundleError(f"{python}: cannot run it ({exc}); set runbook.wheel_python to a CPython "
                          f"{TARGET_PYTHON[0]}.{TARGET_PYTHON[1]}") from exc
    return int(out[0]), int(out[1])


def tag_ok(filename: str, target: tuple[int, int] = TARGET_PYTHON, glibc: tuple[int, int] = TARGET_GLIBC) -> bool:
    """Installable on CPython ``target`` / x86_64 with ``glibc`` (default: Debian 12's 3.11, 2.36)?"""
    m = WHEEL_RE.match(filename)
    if not m:
        return False
    cp = f"cp{target[0]}{target[1]}"
    pys, abis, plats = m["py"].split("."), m["abi"].split("."), m["plat"].split(".")
    py_ok = any(p in ("py3", "py2.py3", cp) or (p.startswith("py3") and p[2:].isdigit()) for p in pys) or \
        ("abi3" in abis and any(p.startswith("cp3") and int(p[3:] or 0) <= target[1] for p in pys))
    abi_ok = any(a in ("none", "abi3", cp) for a in abis)

    def plat_good(p: str) -> bool:
        if p == "any":
            return True
        if p in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"):
            return True
        mm = re.match(r"^manylinux_(\d+)_(\d+)_x86_64$", p)
        return mm is not None and (int(mm[1]), int(mm[2])) <= glibc

    return py_ok and abi_ok and any(plat_good(p) for p in plats)


def _key(reqs: tuple[str, ...], pyver: tuple[int, int], index: str) -> str:
    return hashlib.sha256(json.dumps([list(reqs), list(pyver), index]).encode()).hexdigest()[:16]


def parse_report(report: dict) -> list[tuple[str, str, str]]:
    """pip's installation report -> [(name, version, sha256 of the resolved file)], sorted by name."""
    pins = []
    for item in report.get("install", []):
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        sha = ((item.get("download_info") or {}).get("archive_info") or {}).get("hashes", {}).get("sha256", "")
        if not sha:
            raise BundleError(f"pip resolved {name}=={version} without a sha256 (not from an index archive: "
                              f"{(item.get('download_info') or {}).get('url', '?')}); cannot pin it")
        pins.append((name, version, sha))
    return sorted(pins)


def resolved_txt(pins: list[tuple[str, str, str]], requirements: tuple[str, ...]) -> str:
    lines = ["# Generated by `inv bundle.build`: every distribution pip resolved, with the sha256 of the file",
             "# it downloaded; the wheelhouse is built from exactly this (pip wheel --require-hashes --no-deps).",
             *(f"# top-level: {r}" for r in requirements)]
    return "\n".join(lines + [f"{n}=={v} --hash=sha256:{h}" for n, v, h in pins]) + "\n"


def _index_args(index: str) -> list[str]:
    return ["--index-url", index] if index else []  # none configured: pip's own default


def _resolve(python: Python, requirements: tuple[str, ...], index: str, env: dict, tmp: Path, log) -> str:
    log("pip install --dry-run --report (resolve and hash every dependency) " + " ".join(requirements))
    report = tmp / "report.json"
    r = _sh([*_cmd(python), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--break-system-packages",
             "--quiet", "--report", str(report), *_index_args(index), *requirements], env=env, cwd=tmp)
    if r.returncode != 0:
        raise BundleError(f"pip could not resolve {' '.join(requirements)} (exit {r.returncode}): "
                          f"{(r.stderr or r.stdout).strip()[-900:]}")
    try:
        return resolved_txt(parse_report(json.loads(report.read_text())), requirements)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"pip's resolution report {report} is unreadable ({exc}); pip >= 22.2 is needed "
                          f"(runbook.wheel_python: {python})") from exc


def build(cache: Path, requirements: tuple[str, ...] = DEFAULT_REQUIREMENTS, python: Python = "/usr/bin/python3",
          index: str = "", log=print, target: tuple[int, int] = TARGET_PYTHON,
          glibc: tuple[int, int] = TARGET_GLIBC) -> list[Wheel]:
    """Build (or reuse from the cache) the wheelhouse for ``requirements`` under a CPython ``target``;
    ``house/resolved.txt`` pins it."""
    pyver = _python_version(python)
    if pyver != target:
        raise BundleError(f"{' '.join(_cmd(python))} is Python {pyver[0]}.{pyver[1]}; the hosts run "
                          f"{target[0]}.{target[1]}: set runbook.wheel_python to such a CPython")
    key = _key(requirements, pyver, index)
    house = cache / "wheels" / key
    meta = house / "built.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
            wheels = [Wheel(name=w["name"], version=w["version"], path=house / w["file"], sha256=w["sha256"],
                            built_from_sdist=w["sdist"]) for w in info]
            if (house / RESOLVED).is_file() and all(w.path.is_file() and sha256_file(w.path) == w.sha256
                                                      for w in wheels):
                log(f"wheelhouse: cached ({len(wheels)} wheels, {house})")
                return wheels
        except (ValueError, KeyError, TypeError):
            pass
    tmp = Path(tempfile.mkdtemp(prefix="wheels-", dir=cache))
    try:
        env = clean_env(PIP_CACHE_DIR=str(cache / "pip"))
        (tmp / "w").mkdir()
        lock = tmp / "w" / RESOLVED
        lock.write_text(_resolve(python, requirements, index, env, tmp, log))
        cmd = [*_cmd(python), "-m", "pip", "wheel", "--require-hashes", "--no-deps", *_index_args(index),
               "-w", str(tmp / "w"), "-r", str(lock)]
        log(f"pip wheel --require-hashes --no-deps -r {RESOLVED}")
        r = _sh(cmd, env=env, cwd=tmp)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip()[-900:]
            raise BundleError(f"pip wheel failed (exit {r.returncode}): {tail}")
        built = {canonical(n) for n in re.findall(r"Building wheel for (\S+)", r.stdout)}
        files = sorted((tmp / "w").glob("*.whl"))
        bad = [f.name for f in files if not tag_ok(f.name, target, glibc)]
        if bad:
            raise BundleError(f"wheel(s) not installable on CPython {target[0]}.{target[1]} x86_64 "
                              f"(glibc {glibc[0]}.{glibc[1]}): " + ", ".join(bad))
        wheels = []
        for f in files:
            m = WHEEL_RE.match(f.name)
            assert m
            name = canonical(m["name"])
            wheels.append(Wheel(name=name, version=m["ver"], path=house / f.name, sha256=sha256_file(f),
                                built_from_sdist=name in built))
        shutil.rmtree(house, ignore_errors=True)
        house.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "w").rename(house)
        meta.write_text(json.dumps([{"name": w.name, "version": w.version, "file": w.path.name,
                                     "sha256": w.sha256, "sdist": w.built_from_sdist} for w in wheels],
                                   indent=1))
        return wheels
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def requirements_txt(wheels: list[Wheel], requirements: tuple[str, ...] = DEFAULT_REQUIREMENTS) -> str:
    """Every wheel pinned with its hash; top-level requirements keep their extras."""
    extras = {}
    for req in requirements:
        m = re.match(r"^([A-Za-z0-9._-]+)(\[[^\]]+\])?", req)
        if m and m.group(2):
            extras[canonical(m.group(1))] = m.group(2)
    lines = ["# Generated by `inv bundle.build`; install on a host with:",
             "#   pip install --no-index --find-links DIR --require-hashes -r requirements.txt",
             *(f"# top-level: {r}" for r in requirements)]
    for w in sorted(wheels, key=lambda w: w.name):
        lines.append(f"{w.name}{extras.get(w.name, '')}=={w.version} --hash=sha256:{w.sha256}")
    return "\n".join(lines) + "\n"


def check_offline(wheel_dir: Path, requirements: Path, python: Python = "/usr/bin/python3", log=print,
                  stamp: Path | None = None, tmp_dir: Path | None = None) -> str:
    """Install the wheelhouse into a fresh venv with no index; return `patroni --version`.

    ``stamp`` remembers a pass for this exact requirements.txt (every wheel's hash is in it).
    """
    key = sha256_file(requirements)
    if stamp and stamp.is_file():
        done_key, _, version = stamp.read_text().partition(" ")
        if done_key == key:
            log("offline install check: passed before for these exact wheels (cached)")
            return version.strip()
    version = _install_offline(wheel_dir, requirements, python, log, tmp_dir)
    if stamp:
        stamp.write_text(f"{key} {version}\n")
    return version


def _install_offline(wheel_dir: Path, requirements: Path, python: Python, log, tmp_dir: Path | None) -> str:
    """``tmp_dir``: where the venv goes (a directory the chroot of a chrooted Python sees at the same path)."""
    pre = _cmd(python)[:-1]  # the chroot prefix, if any: the venv's own programs run inside it too
    with tempfile.TemporaryDirectory(prefix="wheelcheck-", dir=tmp_dir) as tmpd:
        venv = Path(tmpd) / "venv"
        r = _sh([*_cmd(python), "-m", "venv", str(venv)], env=clean_env())
        if r.returncode != 0:
            raise BundleError(f"{python} -m venv failed: {r.stderr.strip()[-400:]} "
                              "(the build machine needs python3-venv)")
        log("offline install check: pip install --no-index --require-hashes into a fresh venv")
        r = _sh([*pre, str(venv / "bin/pip"), "install", "--no-index", "--find-links", str(wheel_dir),
                 "--require-hashes", "-r", str(requirements)], env=clean_env())
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip()[-900:]
            raise BundleError(f"the wheelhouse does not install offline: {tail}")
        r = _sh([*pre, str(venv / "bin/patroni"), "--version"], env=clean_env())
        if r.returncode != 0:
            raise BundleError(f"patroni --version failed in the offline venv: {r.stderr.strip()[-400:]}")
        out = (r.stdout or r.stderr).strip()
        r = _sh([*pre, str(venv / "bin/python"), "-c", "import psycopg2, etcd; print(psycopg2.__version__)"],
                env=clean_env())
        if r.returncode != 0:
            raise BundleError("psycopg2/python-etcd do not import in the offline venv: "
                              + r.stderr.strip()[-400:])
        return out
