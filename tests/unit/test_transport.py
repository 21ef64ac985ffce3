"""SshTransport bookkeeping without sockets: a failed host fails fast; commands are wrapped for sudo."""
from __future__ import annotations

import pytest

from runbook.core.transport import SshTransport, TransportError, put_command, wrap


def test_a_host_that_failed_once_fails_fast(inv, monkeypatch):
    calls = []

    def refuse(self, host):
        calls.append(host.name)
        raise TransportError(f"{host.name}: unreachable (test)")

    monkeypatch.setattr(SshTransport, "_open", refuse)
    t = SshTransport()
    h = inv.get("etcd01")
    for _ in range(3):
        with pytest.raises(TransportError, match="etcd01: unreachable"):
            t.run(h, "true")
    assert calls == ["etcd01"]
    t.forget_failures()
    with pytest.raises(TransportError):
        t.run(h, "true")
    assert calls == ["etcd01", "etcd01"]


def test_commands_run_through_sudo_and_content_never_in_argv(inv):
    h = inv.get("etcd01")  # login user `runbook`, sudo: true
    assert wrap(h, "id -u") == "sudo -n -H -- sh -c 'id -u'"
    assert wrap(h, "id -u", user="postgres") == "sudo -n -H -u postgres -- sh -c 'id -u'"
    assert wrap(h, "pwd", user="runbook") == "sh -c pwd"
    # the runbook's own actions and checks hold the host lock: a killed run's leftover finishes first
    assert wrap(h, "dpkg -i x.deb", lock=True) == \
        "sudo -n -H -- flock -w 900 -E 75 /run/lock/pg-ha-runbook.lock sh -c 'dpkg -i x.deb'"
    cmd = put_command("/etc/patroni/config.yml", "0600", "postgres", None)
    assert 'cat > "$t"' in cmd and "umask 077" in cmd and "chmod 0600" in cmd
