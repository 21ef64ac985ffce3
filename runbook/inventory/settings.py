"""The `runbook` section of the invoke config, as one validated model (like the inventory).

Read by every task (the runbook sections, the lab and the bundle) through `load_settings`. Relative
paths resolve against the project root - the directory invoke loaded tasks.py and invoke.yaml from -
never against the current directory, so `inv runbook.status` run from a subdirectory reads the same
ledger. Every problem names where the value came from (the config file and line, or the
INVOKE_RUNBOOK_* variable) and what to do; all problems are reported at once.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from runbook.errors import RunbookError

# The defaults invoke is configured with (runbook/tasks): invoke only applies an INVOKE_RUNBOOK_<KEY>
# variable to a key that exists, so every allowed key is listed, None where "unset" is meaningful.
DEFAULTS: dict[str, Any] = {
    "inventory": "hosts.yml",       # the inventory every task runs against
    "state_dir": "state",           # ledger <cluster>.db, PKI, secrets.yml
    "bundle_dir": "bundle",         # the offline bundle
    "lab_dir": None,                # the lab's hosts (default: <state_dir>/lab)
    "parallel": 16,                 # hosts worked on at once within a step
    "cache": None,                  # bundle.build's download cache (default $RUNBOOK_CACHE or the bundle's)
    "etcd_url": None,               # bundle.build: where to fetch the etcd tarball (with etcd_sha256)
    "etcd_sha256": None,            # bundle.build: the etcd tarball's sha256
    "wheel_python": "/usr/bin/python3",  # bundle.build: the python the wheelhouse is built for
    "patroni_version": "4.1.5",     # bundle.build: the Patroni release the wheelhouse holds
    "pip_index": None,              # bundle.build: Python index (default: pip's own configuration)
    "debian_mirror": None,          # bundle.build: Debian mirror (default: this machine's apt sources)
    "debian_security_mirror": None,  # bundle.build: Debian security mirror (default: this machine's apt sources)
    "allow_downgrade": False,       # postgres.packages: install a bundled package older than the installed one
    "manifest_sha256": None,        # bundle.push: the approved sha256 of manifest.json
    "pki_expiry_days": 30,          # cluster.audit / pki.status: a certificate expiring within this many days
}
ALLOWED_KEYS = tuple(sorted(DEFAULTS))
ENV_PREFIX = "INVOKE_RUNBOOK_"
CONFIG_SUFFIXES = ("yaml", "yml", "json")  # invoke also reads invoke.py; we cannot point at a line there
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class SettingsError(RunbookError):
    """The runbook config section (a file or an INVOKE_RUNBOOK_* variable) is wrong; one line per problem."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("\n       ".join(problems))
        self.problems = list(problems)


def _non_empty_path(v: object) -> object:
    if not isinstance(v, (str, Path)) or not str(v).strip():
        raise ValueError("must be a non-empty path")
    return v


def _optional_text(v: object) -> object:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise ValueError("must be text")
    return v.strip()


class SettingsFile(BaseModel):
    """What the `runbook` section may hold, as written (paths not resolved yet)."""

    model_config = ConfigDict(extra="forbid")

    inventory: Path
    state_dir: Path
    bundle_dir: Path
    lab_dir: Path | None = None
    parallel: int
    cache: Path | None = None
    etcd_url: str | None = None
    etcd_sha256: str | None = None
    wheel_python: str
    patroni_version: str = "4.1.5"
    pip_index: str | None = None
    debian_mirror: str | None = None
    debian_security_mirror: str | None = None
    manifest_sha256: str | None = None
    allow_downgrade: bool = False
    pki_expiry_days: int = 30

    @field_validator("pki_expiry_days", mode="before")
    @classmethod
    def _days(cls, v: object) -> int:
        n = v if isinstance(v, int) and not isinstance(v, bool) else (
            int(v) if isinstance(v, str) and v.strip().isdigit() else -1)
        if n < 1:
            raise ValueError("must be a whole number of days >= 1 (a certificate expiring within it is a finding)")
        return n

    @field_validator("patroni_version", mode="before")
    @classmethod
    def _release(cls, v: object) -> str:
        if not isinstance(v, str) or not re.fullmatch(r"\d+(\.\d+){1,3}", v.strip()):
            raise ValueError("must be a Patroni release number such as 4.1.5 (as on the Python index)")
        return v.strip()

    @field_validator("inventory", "state_dir", "bundle_dir", "wheel_python", mode="before")
    @classmethod
    def _paths(cls, v: object) -> object:
        return _non_empty_path(v)

    @field_validator("lab_dir", "cache", "etcd_url", "pip_index", "debian_mirror", "debian_security_mirror",
                     mode="before")
    @classmethod
    def _optional(cls, v: object) -> object:
        return _optional_text(v)

    @field_validator("parallel", mode="before")
    @classmethod
    def _parallel(cls, v: object) -> int:
        n = 0
        if isinstance(v, int) and not isinstance(v, bool):
            n = v
        elif isinstance(v, str) and v.strip().isdigit():
            n = int(v)
        if n < 1:
            raise ValueError("must be a whole number >= 1 (how many hosts are worked on at once within a step)")
        return n

    @field_validator("etcd_sha256", "manifest_sha256", mode="before")
    @classmethod
    def _sha256(cls, v: object) -> str | None:
        v = _optional_text(v)
        if v is not None and not _SHA256.match(str(v)):
            raise ValueError("must be a sha256: 64 hex digits (as `sha256sum FILE` prints it)")
        return None if v is None else str(v).lower()

    @field_validator("allow_downgrade", mode="before")
    @classmethod
    def _flag(cls, v: object) -> object:
        if isinstance(v, str):  # INVOKE_RUNBOOK_ALLOW_DOWNGRADE=1
            flag = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                    "off": False, "": False}.get(v.strip().lower())
            if flag is None:
                raise ValueError("must be true or false")
            return flag
        return v

    @field_validator("pip_index", "debian_mirror", "debian_security_mirror", "etcd_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(https?|file)://\S+$", v):
            raise ValueError("must be a URL whose scheme is http, https or file")
        return v


class Settings(BaseModel):
    """The resolved settings: every path absolute (relative ones taken from the project root)."""

    model_config = ConfigDict(frozen=True)

    root: Path
    inventory: Path
    state_dir: Path
    bundle_dir: Path
    lab_dir: Path
    parallel: int
    cache: Path | None = None
    etcd_url: str | None = None
    etcd_sha256: str | None = None
    wheel_python: str = "/usr/bin/python3"
    patroni_version: str = "4.1.5"
    pip_index: str | None = None
    debian_mirror: str | None = None
    debian_security_mirror: str | None = None
    manifest_sha256: str | None = None
    allow_downgrade: bool = False
    pki_expiry_days: int = 30
    origins: dict[str, str] = {}  # key -> where its value came from (file, INVOKE_RUNBOOK_*, "default")

    def origin(self, key: str) -> str:
        """Where `key` was set, for messages: 'runbook.state_dir, from INVOKE_RUNBOOK_STATE_DIR'."""
        return f"runbook.{key}, from {self.origins.get(key, 'the defaults')}"


# -- where invoke takes its configuration from ---------------------------------------------------------

def project_root(collection: str = "tasks", cwd: Path | None = None) -> Path:
    """The directory invoke loaded the task collection from, i.e. where it reads the project's invoke.yaml.

    Invoke's loader registers the collection module in sys.modules under its name before running it;
    outside `inv` (tests, scripts), search upwards from the current directory for tasks.py or a tasks
    package, as invoke's FilesystemLoader does. Run from inside the runbook package itself, invoke finds
    runbook/tasks/ first: the project is then the directory that holds the package. Falls back to the
    current directory."""
    package = Path(__file__).resolve().parents[1]  # runbook/

    def outside_package(d: Path) -> Path:
        return package.parent if d == package or package in d.parents else d

    module = sys.modules.get(collection)
    origin = getattr(getattr(module, "__spec__", None), "origin", None)
    if origin:
        p = Path(origin).resolve().parent
        return outside_package(p.parent if Path(origin).name == "__init__.py" else p)
    start = (cwd or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / f"{collection}.py").is_file() or (d / collection / "__init__.py").is_file():
            return outside_package(d)
    return start


def runtime_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file given with `inv -f/--config FILE` (else $INVOKE_RUNTIME_CONFIG), as invoke takes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    for i, a in enumerate(argv):
        if a in ("-f", "--config") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1])
        if a.startswith("-f") and len(a) > 2 and not a.startswith("--"):
            return Path(a[2:])
        if not a.startswith("-"):
            break  # the first task name: what follows are the task's own options
    value = environ.get("INVOKE_RUNTIME_CONFIG")
    return Path(value) if value else None


def config_files(root: Path, runtime: Path | None) -> list[Path]:
    """The config files invoke merges, highest precedence first: runtime, project, user, system."""
    out = [runtime] if runtime else []
    for prefix in (root / "invoke", Path("~/.invoke").expanduser(), Path("/etc/invoke")):
        out += [Path(f"{prefix}.{s}") for s in CONFIG_SUFFIXES if Path(f"{prefix}.{s}").is_file()]
    return out


def _section_keys(path: Path) -> tuple[dict[str, int], list[str]]:
    """(key -> line of the runbook section in `path`, duplicate-key problems). Unreadable: nothing."""
    try:
        root = yaml.compose(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}, []  # invoke itself read (or refused) it; nothing more to say here
    keys: dict[str, int] = {}
    dups = []
    for k, v in (root.value if isinstance(root, yaml.MappingNode) else []):
        if getattr(k, "value", None) != "runbook" or not isinstance(v, yaml.MappingNode):
            continue
        for kk, _ in v.value:
            line = kk.start_mark.line + 1
            if kk.value in keys:
                dups.append(f"{path}:{line}: runbook.{kk.value}: duplicate key (first at line {keys[kk.value]}); "
                            "invoke silently keeps the last one - delete one of them")
            keys.setdefault(kk.value, line)
    return keys, dups


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, ALLOWED_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def env_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """INVOKE_RUNBOOK_* variables invoke would crash on (a non-integer PARALLEL: invoke casts it to int
    while loading its config, before any task runs) or silently ignore (an unknown key)."""
    environ = os.environ if environ is None else environ
    out = []
    for name in sorted(k for k in environ if k.startswith(ENV_PREFIX)):
        key = name.removeprefix(ENV_PREFIX).lower()
        if key not in ALLOWED_KEYS:
            out.append(f"{name}: unknown setting{_did_you_mean(key)}; allowed: "
                       + ", ".join(f"{ENV_PREFIX}{k.upper()}" for k in ALLOWED_KEYS))
        elif key == "parallel" and not environ[name].strip().isdigit():
            out.append(f"{name}={environ[name]!r}: not a whole number; give how many hosts to work on at "
                       "once, e.g. 16")
    return out


# -- validation ------------------------------------------------------------------------------------------

def load_settings(section: object, *, root: Path | None = None, files: Sequence[Path] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Validate the merged `runbook` section (as invoke hands it to a task) and resolve its paths.

    `files` are the config files it was merged from (highest precedence first), read again only to name
    the file and line of a problem and to find duplicate keys. Raises SettingsError with every problem."""
    environ = os.environ if environ is None else environ
    root = (root or project_root()).resolve()
    files = config_files(root, runtime_config(environ=environ)) if files is None else list(files)
    per_file = [(f, *_section_keys(f)) for f in files]

    def origin(key: str | None) -> str:
        if key and f"{ENV_PREFIX}{key.upper()}" in environ:
            return f"{ENV_PREFIX}{key.upper()}"
        for f, keys, _ in per_file:
            if key is None or key in keys:
                return f"{f}:{keys[key]}" if key else str(f)
        return "invoke config"

    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise SettingsError([f"{origin(None)}: runbook: expected a mapping of settings ({', '.join(ALLOWED_KEYS)}), "
                             f"got {type(section).__name__}"])
    problems = [d for _, _, dups in per_file for d in dups]
    data = {**DEFAULTS, **dict(section)}
    try:
        spec = SettingsFile.model_validate(data)
    except ValidationError as exc:
        for e in sorted(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden", str(e["loc"]))):
            key = str(e["loc"][0]) if e["loc"] else ""
            where = origin(key)
            if e["type"] == "extra_forbidden":
                problems.append(f"{where}: runbook.{key}: unknown key{_did_you_mean(key)}; allowed: "
                                f"{', '.join(ALLOWED_KEYS)}")
            else:
                msg = str(e["msg"]).removeprefix("Value error, ")
                problems.append(f"{where}: runbook.{key} = {e.get('input')!r}: {msg}")
        raise SettingsError(problems) from None
    if problems:
        raise SettingsError(problems)

    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else root / p

    origins = {k: o for k in ALLOWED_KEYS if (o := origin(k)) != "invoke config"}
    state = resolve(spec.state_dir)
    return Settings(
        root=root, inventory=resolve(spec.inventory), state_dir=state, bundle_dir=resolve(spec.bundle_dir),
        lab_dir=resolve(spec.lab_dir) if spec.lab_dir else state / "lab", parallel=spec.parallel,
        cache=resolve(spec.cache) if spec.cache else None, etcd_url=spec.etcd_url, etcd_sha256=spec.etcd_sha256,
        wheel_python=spec.wheel_python, patroni_version=spec.patroni_version, pip_index=spec.pip_index,
        debian_mirror=spec.debian_mirror,
        debian_security_mirror=spec.debian_security_mirror, manifest_sha256=spec.manifest_sha256,
        allow_downgrade=spec.allow_downgrade, pki_expiry_days=spec.pki_expiry_days, origins=origins)


def settings_of(c: object) -> Settings:
    """The settings of an invoke Context (its merged `runbook` config section); SettingsError when wrong."""
    config = getattr(c, "config", None)
    section = config.get("runbook", {}) if config is not None else {}
    return load_settings(section)


def default_settings() -> Settings:
    """Outside a task (library use, tests): the project's invoke.yaml merged with INVOKE_RUNBOOK_* as invoke
    would, e.g. for the lab's directory. Raises SettingsError like a task would."""
    root = project_root()
    files = config_files(root, runtime_config())
    merged: dict[str, Any] = {}
    for f in reversed(files):  # lowest precedence first
        try:
            doc = yaml.safe_load(f.read_text()) if f.suffix in (".yaml", ".yml") else None
        except (OSError, yaml.YAMLError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("runbook"), dict):
            merged.update(doc["runbook"])
    for k in ALLOWED_KEYS:
        if f"{ENV_PREFIX}{k.upper()}" in os.environ:
            merged[k] = os.environ[f"{ENV_PREFIX}{k.upper()}"]
    return load_settings(merged, root=root, files=files)
