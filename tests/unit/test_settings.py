"""The one settings model (runbook/inventory/settings.py) and what read-only runs leave behind: nothing.

Settings: every relative path resolves against the project root (not the cwd); each problem names the file
and line or the INVOKE_RUNBOOK_* variable. Read-only: a dry run and an export on a fresh state dir create
no state dir, ledger, secrets.yml, CA or certificate (the fake transport plays the hosts).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_bad_inputs import VALID, inv_run, make_bundle, refused
from test_cli_errors import GUARD, INV, ROOT, TIMEOUT, _env

from runbook.cluster.context import Ctx
from runbook.core.context import Options
from runbook.core.engine import apply
from runbook.core.export import export_markdown
from runbook.core.ledger import Ledger
from runbook.core.testing import FakeTransport
from runbook.inventory import load_inventory
from runbook.inventory.settings import SettingsError, load_settings
from runbook.sections import all_steps


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("netguard")
    (d / "sitecustomize.py").write_text(GUARD)
    return d


# -- the model -------------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    s = load_settings({"state_dir": "st", "inventory": "inv/hosts.yml", "cache": "~/c"}, root=tmp_path,
                      files=[], environ={})
    assert s.state_dir == tmp_path / "st" and s.inventory == tmp_path / "inv/hosts.yml"
    assert s.bundle_dir == tmp_path / "bundle" and s.lab_dir == tmp_path / "st" / "lab"
    assert s.cache == Path("~/c").expanduser() and s.parallel == 16
    assert load_settings({"lab_dir": "/srv/lab"}, root=tmp_path, files=[], environ={}).lab_dir == Path("/srv/lab")


def test_every_problem_names_file_line_or_variable(tmp_path):
    cfg = tmp_path / "invoke.yaml"
    cfg.write_text("runbook:\n  parallel: 0\n  state_dri: x\n  manifest_sha256: abc\n  pip_index: pypi\n")
    section = {"parallel": 0, "state_dri": "x", "manifest_sha256": "abc", "pip_index": "pypi", "etcd_sha256": "z"}
    with pytest.raises(SettingsError) as exc:
        load_settings(section, root=tmp_path, files=[cfg], environ={"INVOKE_RUNBOOK_ETCD_SHA256": "z"})
    p = exc.value.problems
    assert p[0] == (f"{cfg}:3: runbook.state_dri: unknown key (did you mean 'state_dir'?); allowed: "
                    "allow_downgrade, bundle_dir, cache, debian_mirror, debian_security_mirror, etcd_sha256, "
                    "etcd_url, inventory, lab_dir, manifest_sha256, parallel, patroni_version, pip_index, "
                  "pki_expiry_days, state_dir, "
                    "wheel_python")
    assert "INVOKE_RUNBOOK_ETCD_SHA256: runbook.etcd_sha256 = 'z': must be a sha256: 64 hex digits" in p[1]
    assert f"{cfg}:4: runbook.manifest_sha256 = 'abc': must be a sha256" in p[2]
    assert f"{cfg}:2: runbook.parallel = 0: must be a whole number >= 1" in p[3]
    assert f"{cfg}:5: runbook.pip_index = 'pypi': must be a URL" in p[4]
    assert len(p) == 5


def test_bundle_keys_are_validated_and_kept(tmp_path):
    sha = "ab" * 32
    s = load_settings({"manifest_sha256": sha.upper(), "debian_mirror": "http://192.0.2.1/debian",
                       "pip_index": "file:///srv/simple", "etcd_sha256": sha}, root=tmp_path, files=[], environ={})
    assert s.manifest_sha256 == sha and s.etcd_sha256 == sha
    assert s.debian_mirror == "http://192.0.2.1/debian" and s.pip_index == "file:///srv/simple"
    empty = load_settings({"debian_mirror": "", "manifest_sha256": None}, root=tmp_path, files=[], environ={})
    assert empty.debian_mirror is None and empty.manifest_sha256 is None


def test_duplicate_keys_in_a_config_file(tmp_path):
    cfg = tmp_path / "invoke.yaml"
    cfg.write_text("runbook:\n  parallel: 4\n  parallel: 8\n")
    with pytest.raises(SettingsError, match=r"invoke.yaml:3: runbook.parallel: duplicate key \(first at line 2\)"):
        load_settings({"parallel": 8}, root=tmp_path, files=[cfg], environ={})


# -- the CLI: any directory, same ledger; the lab follows state_dir -----------------------------------------

@pytest.mark.parametrize("subdir", ["tests", "runbook/sections"])
def test_a_task_run_from_a_subdirectory_uses_the_project_ledger(guard_dir, tmp_path, subdir):
    """Relative settings are the project's: run from tests/, the ledger is still <root>/<state_dir>; from inside
    the package, where invoke finds runbook/tasks/ first, too."""
    state = tmp_path / "state"
    env = _env(guard_dir, tmp_path, None)
    env.update(INVOKE_RUNBOOK_STATE_DIR=os.path.relpath(state, ROOT),
               INVOKE_RUNBOOK_INVENTORY=os.path.relpath(VALID, ROOT))
    r = subprocess.run([str(INV), "runbook.mark-done", "etcd.pki", "--note", "by hand"], cwd=ROOT / subdir,
                       env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (state / "corpus.db").exists(), sorted(tmp_path.rglob("*"))
    assert not (ROOT / subdir / os.path.relpath(state, ROOT)).resolve().exists()


def test_lab_follows_state_dir(guard_dir, tmp_path):
    """`inv lab.status` reads the lab of runbook.state_dir (<state_dir>/lab), not a state/ next to the inventory."""
    inventory = tmp_path / "elsewhere" / "hosts.yml"
    inventory.parent.mkdir()
    inventory.write_text(VALID.read_text().replace("etcd0", "h2t-etcd0").replace("node0", "h2t-node0"))
    (tmp_path / "state" / "lab" / "hosts" / "h2t-node01" / "upper").mkdir(parents=True)
    r = inv_run(["lab.status"], guard_dir, tmp_path, inventory=inventory)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if "h2t-" in line}
    assert "off (disk kept)" in rows["h2t-node01"] and "absent" in rows["h2t-etcd01"], r.stdout
    assert not (inventory.parent / "state").exists()


# -- nothing written on bad input or in read-only modes -------------------------------------------------------

def test_host_without_the_section_role_is_refused_before_the_bundle(guard_dir, tmp_path):
    r = inv_run(["etcd.install", "--hosts", "node01"], guard_dir, tmp_path, bundle=tmp_path / "no-bundle")
    out = refused(r, tmp_path, "--hosts: node01 has no etcd role (its roles: postgres)",
                  "etcd.install runs on the etcd hosts", "etcd01, etcd02, etcd03")
    assert "bundle" not in out
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("args", [["cluster.up", "--dry"], ["runbook.export"], ["runbook.status"],
                                  ["etcd.install", "--dry", "--hosts", "etcd01"]])
def test_read_only_commands_create_nothing(guard_dir, tmp_path, args):
    root = make_bundle(tmp_path / "bundle")
    r = inv_run(args, guard_dir, tmp_path, bundle=root)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: a dry run could not compare with TEST-NET hosts
    assert not (tmp_path / "state").exists(), sorted((tmp_path / "state").rglob("*"))


def _read_only_ctx(tmp_path: Path, state: Path) -> Ctx:
    ctx = Ctx(inventory=load_inventory(VALID), transport=FakeTransport(), state_dir=state,
              bundle_dir=make_bundle(tmp_path / "bundle"), options=Options(dry=True), read_only=True)
    ctx.local = ctx.transport
    ctx.ledger = Ledger(":memory:", redact=ctx.redact)
    return ctx


def test_dry_run_and_export_on_a_fresh_state_dir_leave_it_empty(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    ctx = _read_only_ctx(tmp_path, state)
    report = apply(ctx, all_steps(), ctx.inventory.hosts)
    assert [d for d in report.plan if d.step.name == "etcd.tls" and d.run]
    text = export_markdown(ctx, all_steps())
    assert list(state.iterdir()) == []
    assert ctx.transport.writes == []
    # the in-memory passwords are masked like real ones; the in-memory CA signs the certificates put
    assert ctx.secrets["superuser"]["password"] not in text and "***" in text
    ca = ctx.pki.ca()
    assert not ca.cert_path.exists()
    tls = next(d for d in report.plan if d.step.name == "etcd.tls")
    assert any(getattr(a, "content", None) == ctx.pki.ca_pem() for a in tls.actions)


def test_dry_run_reads_an_existing_pki_and_secrets_without_adding(tmp_path):
    from runbook.credentials.pki import ensure_ca
    from runbook.credentials.secrets import ensure_secrets

    state = tmp_path / "state"
    ca = ensure_ca(state / "pki")
    secrets = ensure_secrets(state)
    before = sorted(p.name for p in state.rglob("*"))
    ctx = _read_only_ctx(tmp_path, state)
    apply(ctx, all_steps(), ctx.inventory.hosts)
    assert sorted(p.name for p in state.rglob("*")) == before  # no host certificate issued on disk
    assert ctx.pki.ca().fingerprint == ca.fingerprint and ctx.secrets == secrets
