"""Issue 7, bad inputs other than the inventory (tests/data/inventories has that corpus): invoke config,
the bundle, the PKI and state/secrets.yml. Each is one clear error naming what and where, a non-zero
exit, and - since each can be found before connecting - no socket opened (the audit-hook guard of
test_cli_errors.py) and nothing written to a host. Host problems (unreachable, wrong key, unknown host
key, no sudo) need real hosts: tests/e2e/test_bad_hosts.py.

The PKI cases the runbook repairs by design (expired, wrong SAN, foreign CA: re-issued) are run through
the real etcd.pki / etcd.tls steps with the fake transport; the ones it must refuse (a CA key others can
read, half a CA) go through `inv etcd.install --dry`.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from test_cli_errors import CORPUS, GUARD, INV, ROOT, TIMEOUT, _env, net_log

from runbook.bundle.manifest import MANIFEST, REQUIREMENTS, make_entry, write_manifest

VALID = CORPUS / "valid.yml"  # TEST-NET-1 addresses: a connection attempt could never succeed anyway
ETCD = "etcd/etcd-v3.5.16-linux-amd64.tar.gz"
BUNDLE_FILES = {
    ETCD: ("etcd", ("etcd",), b"not really a tarball\n" * 50),
    "debs/debian12/postgresql-15_15.10-0+deb12u1_amd64.deb": ("deb", ("postgres",), b"deb" * 200),
    "wheels/patroni-4.1.5-py3-none-any.whl": ("wheel", ("postgres",), b"wheel" * 60),
    REQUIREMENTS: ("meta", ("postgres",), b"patroni==4.1.5 --hash=sha256:00\n"),
}


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    """The socket audit hook of test_cli_errors.py, as a sitecustomize for the `inv` subprocesses."""
    d = tmp_path_factory.mktemp("netguard")
    (d / "sitecustomize.py").write_text(GUARD)
    return d


def make_bundle(root: Path, skip: tuple[str, ...] = ()) -> Path:
    """A small, valid bundle (its manifest lists every file except those in skip)."""
    entries = []
    for rel, (kind, roles, data) in BUNDLE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        if rel not in skip:
            entries.append(make_entry(root, rel, kind=kind, version="1", source="test", roles=roles))
    write_manifest(root, entries, etcd_version="3.5.16", target={"os": "debian12"}, created="now")
    return root


def inv_run(args: list[str], guard_dir: Path, tmp_path: Path, *, inventory: Path | None = VALID,
            bundle: Path | None = None, **env: str | None) -> subprocess.CompletedProcess:
    e = _env(guard_dir, tmp_path, inventory)
    if bundle is not None:
        e["INVOKE_RUNBOOK_BUNDLE_DIR"] = str(bundle)
    e.update(env)
    e = {k: v for k, v in e.items() if v is not None}  # None: unset it
    return subprocess.run([str(INV), *args], cwd=ROOT, env=e, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def refused(r: subprocess.CompletedProcess, tmp_path: Path, *expect: str, code: int | None = 2) -> str:
    """Non-zero exit (code when given), every expected piece in stderr, no traceback, no socket."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert code is None or r.returncode == code, (r.returncode, out)
    assert "Traceback" not in out, out
    for piece in expect:
        assert piece in out, f"{piece!r} not in:\n{out}"
    assert net_log(tmp_path) == "", net_log(tmp_path)
    return out


def checkpoints(state: Path) -> list[tuple[str, str, str]]:
    dbs = list(state.glob("*.db")) if state.exists() else []
    if not dbs:
        return []
    with sqlite3.connect(dbs[0]) as db:
        return db.execute("SELECT host, step, status FROM checkpoints ORDER BY host, step").fetchall()


# -- invoke config -------------------------------------------------------------------------------------

def test_inventory_setting_names_a_directory(guard_dir, tmp_path):
    r = inv_run(["cluster.up"], guard_dir, tmp_path, inventory=CORPUS)
    refused(r, tmp_path, str(CORPUS), "Is a directory", "INVOKE_RUNBOOK_INVENTORY")
    assert not (tmp_path / "state").exists()


def test_inventory_setting_names_a_missing_file_for_a_run(guard_dir, tmp_path):
    r = inv_run(["cluster.up"], guard_dir, tmp_path, inventory=tmp_path / "nope" / "hosts.yml")
    refused(r, tmp_path, "nope/hosts.yml", "No such file", "runbook.inventory")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("value,expect", [
    ("abc", "INVOKE_RUNBOOK_PARALLEL='abc': not a whole number"),
    ("-3", "INVOKE_RUNBOOK_PARALLEL='-3': not a whole number"),
    ("0", "INVOKE_RUNBOOK_PARALLEL: runbook.parallel = 0: must be a whole number >= 1"),
], ids=["abc", "negative", "zero"])
def test_parallel_env_is_refused(guard_dir, tmp_path, value, expect):
    r = inv_run(["etcd.install", "--dry"], guard_dir, tmp_path, INVOKE_RUNBOOK_PARALLEL=value)
    refused(r, tmp_path, expect)
    assert not (tmp_path / "state").exists()


def test_unknown_runbook_env_var_is_refused(guard_dir, tmp_path):
    """invoke silently ignores INVOKE_RUNBOOK_STATEDIR: the run would use ./state, the wrong ledger."""
    r = inv_run(["runbook.status"], guard_dir, tmp_path, INVOKE_RUNBOOK_STATEDIR=str(tmp_path / "elsewhere"))
    refused(r, tmp_path, "INVOKE_RUNBOOK_STATEDIR: unknown setting (did you mean 'state_dir'?)",
            "INVOKE_RUNBOOK_STATE_DIR")


@pytest.mark.parametrize("var,value,expect", [
    ("INVOKE_RUNBOOK_MANIFEST_SHA256", "abc", "runbook.manifest_sha256 = 'abc': must be a sha256: 64 hex digits"),
    ("INVOKE_RUNBOOK_DEBIAN_MIRROR", "mirror", "runbook.debian_mirror = 'mirror': must be a URL"),
    ("INVOKE_RUNBOOK_INVENTORY", "", "runbook.inventory = '': must be a non-empty path"),
], ids=["manifest-sha256", "debian-mirror", "empty-inventory"])
def test_bad_runbook_env_value_is_refused(guard_dir, tmp_path, var, value, expect):
    """Every key of the settings model can be set from the environment, and is validated there too."""
    r = inv_run(["cluster.up", "--dry"], guard_dir, tmp_path, **{var: value})
    refused(r, tmp_path, f"{var}: {expect}")
    assert not (tmp_path / "state").exists()


def test_state_dir_is_a_file(guard_dir, tmp_path):
    f = tmp_path / "state-file"
    f.write_text("not a directory\n")
    r = inv_run(["etcd.install"], guard_dir, tmp_path, INVOKE_RUNBOOK_STATE_DIR=str(f))
    refused(r, tmp_path, f"state dir {f} (runbook.state_dir, from INVOKE_RUNBOOK_STATE_DIR) is not a directory")
    assert f.read_text() == "not a directory\n"


def test_state_dir_under_a_file(guard_dir, tmp_path):
    f = tmp_path / "state-file"
    f.write_text("")
    r = inv_run(["runbook.history"], guard_dir, tmp_path, INVOKE_RUNBOOK_STATE_DIR=str(f / "state"))
    refused(r, tmp_path, f"state dir {f / 'state'}", "cannot be created: Not a directory")


def test_state_dir_not_writable(tmp_path):
    """Root writes anywhere: the run goes through setpriv as nobody (or as the current non-root user)."""
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"badin-ro-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        ro = base / "state"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}
        env.update(INVOKE_RUNBOOK_INVENTORY=str(VALID), INVOKE_RUNBOOK_STATE_DIR=str(ro), NO_COLOR="1",
                   HOME=str(base), PYTHONDONTWRITEBYTECODE="1")
        cmd = [str(INV), "etcd.install"]  # a command that records: a view would only read
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.fail("needs setpriv (util-linux) to drop root")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=TIMEOUT, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert f"state dir {ro}" in r.stderr and "is not writable by uid" in r.stderr, r.stderr
        assert list(ro.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bundle_dir_missing(guard_dir, tmp_path):
    missing = tmp_path / "no-bundle"
    r = inv_run(["cluster.up"], guard_dir, tmp_path, bundle=missing)
    refused(r, tmp_path, f"{missing}: no bundle directory", "inv bundle.build",
            "(runbook.bundle_dir, from INVOKE_RUNBOOK_BUNDLE_DIR)")
    assert checkpoints(tmp_path / "state") == []


def _config_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "runbook-config.yaml"
    p.write_text(text)
    return p


def test_config_file_unknown_key(guard_dir, tmp_path):
    cfg = _config_file(tmp_path, f"runbook:\n  inventroy: {VALID}\n  paralel: 4\n")
    r = inv_run(["-f", str(cfg), "etcd.install", "--dry"], guard_dir, tmp_path)
    out = refused(r, tmp_path, f"{cfg}:2: runbook.inventroy: unknown key (did you mean 'inventory'?)",
                  f"{cfg}:3: runbook.paralel: unknown key (did you mean 'parallel'?)",
                  "allowed: allow_downgrade, bundle_dir, cache, debian_mirror, debian_security_mirror, etcd_sha256, "
                  "etcd_url, inventory, lab_dir, manifest_sha256, parallel, patroni_version, pip_index, "
                  "pki_expiry_days, state_dir, "
                  "wheel_python")
    assert out.count("unknown key") == 2  # every problem at once


def test_config_file_duplicate_key(guard_dir, tmp_path):
    cfg = _config_file(tmp_path, f"runbook:\n  inventory: {VALID}\n  parallel: 4\n  parallel: 8\n")
    r = inv_run(["-f", str(cfg), "runbook.status"], guard_dir, tmp_path)
    refused(r, tmp_path, f"{cfg}:4: runbook.parallel: duplicate key (first at line 3)")


def test_config_file_parallel_not_a_number(guard_dir, tmp_path):
    cfg = _config_file(tmp_path, "runbook:\n  parallel: many\n")
    r = inv_run(["-f", str(cfg), "cluster.up", "--dry"], guard_dir, tmp_path)
    refused(r, tmp_path, f"{cfg}:2: runbook.parallel = 'many': must be a whole number >= 1")


def test_config_file_empty_state_dir(guard_dir, tmp_path):
    cfg = _config_file(tmp_path, "runbook:\n  state_dir:\n")
    r = inv_run(["-f", str(cfg), "runbook.status"], guard_dir, tmp_path, INVOKE_RUNBOOK_STATE_DIR=None)
    refused(r, tmp_path, f"{cfg}:2: runbook.state_dir = None: must be a non-empty path")


# -- the bundle: `inv cluster.up` stops at bundle.verify (local) before any host is touched ------------

def _drop_etcd_entry(root: Path, remove_file: bool) -> None:
    m = root / MANIFEST
    doc = json.loads(m.read_text())
    doc["files"] = [f for f in doc["files"] if f["kind"] != "etcd"]
    m.write_text(json.dumps(doc))
    if remove_file:
        (root / ETCD).unlink()


BUNDLE_CASES = {
    # name: (damage, exit code, expected pieces)
    "no-manifest": (lambda r: (r / MANIFEST).unlink(), 2, ["manifest.json: missing", "re-copy the bundle"]),
    "bad-json": (lambda r: (r / MANIFEST).write_text('{"format": 1, "files": [\n'), 2,
                 ["manifest.json: not valid JSON", "line 2"]),
    "file-missing": (lambda r: (r / "wheels/patroni-4.1.5-py3-none-any.whl").unlink(), 1,
                     ["patroni-4.1.5-py3-none-any.whl: missing (manifest lists 300 bytes, wheel)"]),
    "truncated": (lambda r: (r / ETCD).write_bytes((r / ETCD).read_bytes()[:100]), 1,
                  [f"{ETCD}: truncated: 100 bytes, manifest says 1050"]),
    "altered": (lambda r: (r / REQUIREMENTS).write_bytes(b"patroni==4.1.6 --hash=sha256:00\n"), 1,
                ["requirements.txt: sha256 mismatch (altered or corrupt)"]),
    "foreign-file": (lambda r: (r / "debs/debian12/evil_1.0_amd64.deb").write_bytes(b"x"), 1,
                     ["evil_1.0_amd64.deb: extra file, not in the manifest"]),
    "etcd-entry-missing": (lambda r: _drop_etcd_entry(r, remove_file=False), 1,
                           [f"{ETCD}: extra file, not in the manifest"]),
    "etcd-entry-and-file-missing": (lambda r: _drop_etcd_entry(r, remove_file=True), 1,
                                    ["the bundle lacks what these hosts need: etcd01 (debian12): the etcd release "
                                     "tarball"]),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_bad_bundle_stops_cluster_up_at_bundle_verify(guard_dir, tmp_path, case):
    damage, code, expect = BUNDLE_CASES[case]
    root = make_bundle(tmp_path / "bundle")
    damage(root)
    r = inv_run(["cluster.up"], guard_dir, tmp_path, bundle=root)
    out = refused(r, tmp_path, str(root), *expect, code=code)
    cps = checkpoints(tmp_path / "state")
    if code == 1:  # the manifest loads: the local verify step ran and failed, nothing after it
        assert "bundle.verify" in out, out
        assert cps == [("local", "bundle.verify", "failed")], cps
    else:  # the manifest itself is unusable: refused while planning bundle.verify
        assert cps == [], cps


def test_good_bundle_reaches_the_hosts(guard_dir, tmp_path):
    """The control for the cases above: the same bundle undamaged passes bundle.verify and only then tries
    the (TEST-NET, unreachable) hosts - so the guard would have seen a connection had verify let one through."""
    root = make_bundle(tmp_path / "bundle")
    r = inv_run(["cluster.up"], guard_dir, tmp_path, bundle=root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "bundle.push" in r.stdout + r.stderr and "unreachable" in r.stdout + r.stderr
    assert "socket.connect" in net_log(tmp_path)
    assert ("local", "bundle.verify", "done") in checkpoints(tmp_path / "state")
