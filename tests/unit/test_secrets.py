"""runbook.secrets: passwords generated once, kept 0600, redacted everywhere."""
from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import pytest

from runbook.credentials import secrets as sec


def test_generated_once_with_expected_users(tmp_path: Path) -> None:
    s = sec.ensure_secrets(tmp_path / "state")
    assert {r: e["username"] for r, e in s.items()} == {
        "superuser": "postgres", "replication": "replicator", "rewind": "rewind_user",
        "admin": "admin", "restapi": "patroni", "etcd": "patroni"}
    pws = [e["password"] for e in s.values()]
    assert len(set(pws)) == len(pws)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", p) and not p.startswith("-") for p in pws)
    path = tmp_path / "state" / "secrets.yml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    assert sec.ensure_secrets(tmp_path / "state") == s
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name != "secrets.yml"], "no temp files left"


def test_missing_entry_is_added_existing_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yml"
    path.write_text("superuser: {username: postgres, password: keep-me-please-1234}\n")
    path.chmod(0o600)
    s = sec.ensure_secrets(tmp_path)
    assert s["superuser"]["password"] == "keep-me-please-1234"
    assert set(s) == set(sec.USERS)
    assert sec.ensure_secrets(tmp_path) == s


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_group_or_world_readable_file_is_refused(tmp_path: Path, mode: int) -> None:
    sec.ensure_secrets(tmp_path)
    (tmp_path / "secrets.yml").chmod(mode)
    with pytest.raises(sec.SecretsError, match=r"group/others .*chmod 600"):
        sec.ensure_secrets(tmp_path)


def test_malformed_and_duplicate_keys_refused(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yml"
    path.write_text("admin: {username: admin, password: a}\nadmin: {username: admin, password: b}\n")
    path.chmod(0o600)
    with pytest.raises(sec.SecretsError, match="duplicate key"):
        sec.ensure_secrets(tmp_path)
    path.write_text("admin: hunter2\n")
    with pytest.raises(sec.SecretsError, match="admin: expected"):
        sec.ensure_secrets(tmp_path)


def test_redact(tmp_path: Path) -> None:
    s = sec.ensure_secrets(tmp_path)
    pw = s["replication"]["password"]
    basic = base64.b64encode(f"patroni:{s['restapi']['password']}".encode()).decode()
    text = (f"PGPASSWORD={pw} psql -U replicator\n"
            f"Authorization: Basic {basic}\n"
            f"admin={s['admin']['password']} super={s['superuser']['password']}")
    out = sec.redact(text, s)
    assert out == ("PGPASSWORD=*** psql -U replicator\nAuthorization: Basic ***\nadmin=*** super=***")
    for e in s.values():
        assert e["password"] not in out
    assert "replicator" in out  # usernames are not secret


def test_redact_flat_inputs() -> None:
    assert sec.redact("a=s3cr3t b=s3cr3t-longer", ["s3cr3t", "s3cr3t-longer"]) == "a=*** b=***"
    assert sec.redact("x=abc", {"token": "abc"}) == "x=***"
    assert sec.redact("nothing here", []) == "nothing here"
    assert sec.redact("keep", [""]) == "keep"
