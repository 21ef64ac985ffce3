"""--verify's cheap checks (issue 16), run for real by the local shell on temporary files: the bundle's stat
record (re-hash only what changed since it hashed right), the venv's mark and dpkg's status read once.
The commands are the ones the hosts run; only the paths are temporary."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from runbook.core.files import files_check, stat_commit, stat_record, stat_verified
from runbook.core.step import Upload
from runbook.sections.postgres import installed


def sh(cmd: str) -> int:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=60).returncode


def uploads(tmp: Path, mark: Path, n: int = 3) -> list[Upload]:
    out = []
    for i in range(n):
        f = tmp / f"file {i}.deb"  # a space in the path: stat's line keeps it whole
        data = f"content {i}\n".encode() * 100
        f.write_bytes(data)
        out.append(Upload(f, str(f), hashlib.sha256(data).hexdigest(), len(data), stat_mark=str(mark)))
    return out


def record(ups: list[Upload], mark: Path) -> None:
    assert sh(f"{stat_record([u.path for u in ups], str(mark))} && {stat_commit(str(mark))}") == 0


@pytest.fixture
def recorded(tmp_path) -> tuple[list[Upload], Path]:
    """Three uploads on disk and the record taken when they hashed right."""
    mark = tmp_path / "bundle.stat"
    ups = uploads(tmp_path, mark)
    record(ups, mark)
    return ups, mark


def rewrite_keeping_mtime(path: Path, old: bytes, new: bytes) -> None:
    """Change the file's content, same size, and put its mtime back: only its ctime tells."""
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_the_record_is_root_only_and_written_only_once_the_files_hashed_right(tmp_path):
    mark = tmp_path / "lib" / "bundle.stat"
    ups = uploads(tmp_path, mark)
    assert sh(stat_record([u.path for u in ups], str(mark)) + " && false && " + stat_commit(str(mark))) != 0
    assert not mark.exists() and (tmp_path / "lib" / "bundle.stat.pending").exists()  # never vouched
    record(ups, mark)
    assert oct(mark.stat().st_mode & 0o777) == "0o600" and oct(mark.parent.stat().st_mode & 0o777) == "0o700"
    assert len(mark.read_text().splitlines()) == 3 and "file 0.deb" in mark.read_text()


def test_unchanged_files_are_not_read_again(recorded):
    ups, mark = recorded
    assert sh(stat_verified(ups, str(mark))) == 0
    # proof that nothing is hashed: a file made unreadable for sha256sum (0000) would fail a re-hash as root
    # too, so instead the wanted sums are made wrong: with the record matching, no sum is compared
    wrong = [Upload(u.src, u.path, "0" * 64, u.size, stat_mark=u.stat_mark) for u in ups]
    assert sh(stat_verified(wrong, str(mark))) == 0
    # ... and once the record is gone, every file is hashed again and the wrong sums fail
    mark.unlink()
    assert sh(stat_verified(wrong, str(mark))) != 0
    assert sh(stat_verified(ups, str(mark))) == 0  # no record: all re-hashed, all right


def test_a_file_changed_with_its_size_and_mtime_put_back_is_hashed_again_and_fails(recorded):
    ups, mark = recorded
    rewrite_keeping_mtime(Path(ups[1].path), b"content", b"CONTENT")
    assert sh(stat_verified(ups, str(mark))) != 0


def test_a_file_touched_but_intact_passes_by_its_hash(recorded):
    ups, mark = recorded
    os.chmod(ups[0].path, 0o644)  # ctime moves, the content does not
    os.utime(ups[2].path)
    assert sh(stat_verified(ups, str(mark))) == 0
    wrong = [Upload(u.src, u.path, "0" * 64 if i == 0 else u.sha256, u.size, stat_mark=u.stat_mark)
             for i, u in enumerate(ups)]
    assert sh(stat_verified(wrong, str(mark))) != 0  # ... and it was really hashed


def test_a_missing_or_replaced_file_fails(recorded):
    ups, mark = recorded
    p = Path(ups[0].path)
    data = p.read_bytes()
    p.unlink()
    assert sh(stat_verified(ups, str(mark))) != 0
    p.write_bytes(data[:-1] + b"X")  # a new inode with the same size
    assert sh(stat_verified(ups, str(mark))) != 0
    p.write_bytes(data)
    assert sh(stat_verified(ups, str(mark))) == 0


def test_files_check_uses_the_record_with_verify_only(tmp_path):
    mark = tmp_path / "bundle.stat"
    ups = uploads(tmp_path, mark)
    plain = Upload(ups[0].src, "/x/other", "a" * 64, 1)
    cheap = files_check([*ups, plain])
    full = files_check([*ups, plain], full=True)
    assert str(mark) not in cheap and "sha256sum" not in cheap
    assert full.count(str(mark)) == 1
    # the marked files are hashed only through the record's check, the unmarked one as before
    assert f"'{'a' * 64}  /x/other'" in full and f"'{ups[0].sha256}  {ups[0].path}'" not in full


# -- patroni.wheels: the venv's files against the record taken when its imports last passed ------------------
def venv(tmp: Path) -> tuple[str, str]:
    """A venv-shaped tree; (the command printing its state, the command the check runs against a mark)."""
    from runbook.sections.patroni import venv_state

    v = tmp / "patroni"
    site = v / "lib" / "python3.11" / "site-packages"
    for pkg in ("patroni", "psycopg2", "etcd"):
        (site / pkg / "__pycache__").mkdir(parents=True)
        (site / pkg / "__init__.py").write_text(f"# {pkg}\n")
        (site / f"{pkg}-1.0.dist-info").mkdir()
        (site / f"{pkg}-1.0.dist-info" / "RECORD").write_text(f"{pkg}/__init__.py,,\n")
    (v / "bin").mkdir()
    (v / "bin" / "patroni").write_text("#!/bin/sh\n")
    os.symlink("/usr/bin/python3", v / "bin" / "python")
    (v / "pyvenv.cfg").write_text("home = /usr/bin\n")

    class Paths:
        patroni_venv = str(v)

    class Ctx:
        paths = Paths()

    state = venv_state(Ctx())
    return state, f"test \"$({state})\" = \"$(cat {tmp}/mark 2>/dev/null)\""


def test_the_venv_mark_sees_a_package_removed_a_file_written_or_added_and_not_bytecode(tmp_path):
    state, check = venv(tmp_path)
    assert sh(check) != 0  # no mark yet
    assert sh(f"{state} > {tmp_path}/mark") == 0 and sh(check) == 0
    site = tmp_path / "patroni" / "lib" / "python3.11" / "site-packages"
    (site / "etcd" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"bytecode")  # an import as root
    assert sh(check) == 0
    rewrite_keeping_mtime(site / "psycopg2" / "__init__.py", b"psycopg2", b"PSYCOPG2")
    assert sh(check) != 0
    assert sh(f"{state} > {tmp_path}/mark") == 0 and sh(check) == 0
    (site / "extra.pth").write_text("import os\n")
    assert sh(check) != 0
    (site / "extra.pth").unlink()
    assert sh(check) == 0  # the same files again
    for f in (site / "patroni").iterdir():  # the package gone (pip uninstall)
        if f.is_file():
            f.unlink()
    assert sh(check) != 0


def test_the_wheels_step_records_the_venv_before_its_imports_and_keeps_it_only_when_they_pass(ctx, bundle):
    from runbook.core.step import Run
    from runbook.sections.patroni import WHEELS_MARK, wheels

    node = ctx.inventory.get("node01")
    last = wheels.actions_fn(ctx, node)[-1]
    assert isinstance(last, Run)
    cmd = last.cmd
    assert cmd.index(f"> {WHEELS_MARK}.pending") < cmd.index("-B -c 'import patroni.__main__, psycopg2, etcd'") \
        < cmd.index(f"mv {WHEELS_MARK}.pending {WHEELS_MARK}")
    assert "install -d -m 0700 /var/lib/pg-ha-runbook" in cmd and "umask 077" in cmd
    probe = wheels.probe(ctx, node)
    assert WHEELS_MARK in probe and "python" not in probe  # no interpreter started by the check


def test_bundle_push_records_stat_before_hashing_and_verify_reads_the_record(ctx, bundle):
    from runbook.sections.push import STAT_MARK, SUMS, push

    host = ctx.inventory.get("etcd01")
    actions = push.actions_fn(ctx, host)
    ups = [a for a in actions if isinstance(a, Upload)]
    assert ups and all(u.stat_mark == STAT_MARK for u in ups)
    last = actions[-1].cmd
    assert last.index(f"{STAT_MARK}.pending") < last.index(f"sha256sum --quiet -c {SUMS}") \
        < last.index(f"mv {STAT_MARK}.pending {STAT_MARK}")
    assert STAT_MARK not in push.probe(ctx, host)  # every run: sizes only
    ctx.options.verify = True
    full = push.probe(ctx, host)
    assert STAT_MARK in full and f"'{ups[0].sha256}  {ups[0].path}'" not in full
    assert STAT_MARK in " ".join(a.cmd for a in push.undo_fn(ctx, host))


# -- postgres.packages: dpkg's status file read once ------------------------------------------------------
STATUS = """Package: postgresql-15
Status: install ok installed
Version: 15.14-0+deb12u1

Package: python3-venv
Status: deinstall ok config-files
Version: 3.11.2-1+b1

Package: libpq5
Status: install ok installed
Description: mentions Package: python3-venv
 Status: install ok installed
"""


def test_installed_reads_each_stanza_status(tmp_path):
    st = tmp_path / "status"
    st.write_text(STATUS)
    assert sh(installed(["postgresql-15"], str(st))) == 0
    assert sh(installed(["postgresql-15", "libpq5"], str(st))) == 0
    assert sh(installed(["postgresql-15", "python3-venv"], str(st))) != 0  # removed, its config kept
    assert sh(installed(["postgresql-17"], str(st))) != 0  # never installed
    st.write_text(STATUS.replace("deinstall ok config-files", "install ok installed"))
    assert sh(installed(["postgresql-15", "python3-venv"], str(st))) == 0
    assert sh(installed(["postgresql-15"], str(tmp_path / "absent"))) != 0


# -- bundle.verify: the local bundle's stat record ----------------------------------------------------------
def local_bundle(root: Path) -> Path:
    from runbook.bundle.manifest import make_entry, write_manifest

    entries = []
    for rel in ("debs/a.deb", "debs/b.deb", "wheels/requirements.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 50)
        entries.append(make_entry(root, rel, kind="deb", version="1", source="test", roles=("postgres",)))
    write_manifest(root, entries, etcd_version="3.5.16", target={"os": "debian12"}, created="now")
    return root


def test_bundle_verify_rehashes_only_what_changed_since_the_record(tmp_path, monkeypatch):
    from runbook.bundle import manifest as mf

    root = local_bundle(tmp_path / "bundle")
    record = tmp_path / "state" / "bundle.stat.json"
    record.parent.mkdir()
    read: list[str] = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    mf.verify_bundle(root, record=record, keep=False)  # a dry run writes nothing
    assert not record.exists()
    read.clear()
    mf.verify_bundle(root, record=record)
    assert sorted(read) == ["a.deb", "b.deb", "requirements.txt"]
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    read.clear()
    mf.verify_bundle(root, record=record)
    assert read == []  # nothing changed: nothing read
    os.utime(root / "debs/b.deb")  # touched, intact: read again, passes
    mf.verify_bundle(root, record=record)
    assert read == ["b.deb"]
    read.clear()
    a = root / "debs/a.deb"
    rewrite_keeping_mtime(a, b"debs", b"DEBS")
    with pytest.raises(mf.BundleError, match="a.deb: sha256 mismatch"):
        mf.verify_bundle(root, record=record)
    a.write_bytes(a.read_bytes().replace(b"DEBS", b"debs", 1))
    mf.verify_bundle(root, record=record)
    other = local_bundle(tmp_path / "copy")  # another bundle directory: the record does not vouch for it
    read.clear()
    mf.verify_bundle(other, record=record)
    assert sorted(read) == ["a.deb", "b.deb", "requirements.txt"]
    record.write_text("not json")
    read.clear()
    mf.verify_bundle(root, record=record)
    assert len(read) == 3
