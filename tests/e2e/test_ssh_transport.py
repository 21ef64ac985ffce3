"""SshTransport on a real lab host: stdin bytes arrive unchanged, big output on both streams, the budget
gives rc 124 and leaves no command running, the host lock, and sudo refusal as a clear TransportError."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from runbook.core.transport import SshTransport, TransportError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def host(lab):
    return lab.etcd[0]


def test_binary_stdin_arrives_byte_for_byte(lab_transport, host):
    data = os.urandom(3 << 20) + "ü€ — not UTF-8 safe when cut".encode() + bytes(range(256))
    r = lab_transport.run(host, "sha256sum | cut -d' ' -f1", stdin=data, timeout=60)
    assert r.ok, r.stderr
    assert r.stdout.strip() == hashlib.sha256(data).hexdigest()


def test_large_stdout_and_stderr_together_do_not_stall(lab_transport, host):
    # 4 MB on stderr while stdout is also written: both exceed SSH's 2 MB window
    cmd = "head -c 4194304 /dev/zero | tr '\\0' e >&2; head -c 4194304 /dev/zero | tr '\\0' o; echo; exit 3"
    r = lab_transport.run(host, cmd, timeout=60)
    assert r.rc == 3
    assert r.stdout.count("o") == 4194304 and r.stderr.count("e") == 4194304


def test_non_ascii_output_survives(lab_transport, host):
    text = "Привет, кластер — ü€ " * 5000  # multi-byte characters across every read boundary
    r = lab_transport.run(host, "cat", stdin=text.encode(), timeout=30)
    assert r.stdout == text


def test_timeout_is_rc_124_in_time_and_the_connection_stays_usable(lab_transport, host):
    probe = f"sleep 30.0{os.getpid()}"  # a command line no one else runs
    t0 = time.monotonic()
    r = lab_transport.run(host, f"echo started; {probe}", timeout=1.5)
    took = time.monotonic() - t0
    assert r.rc == 124 and "timed out after 1.5s" in r.stderr
    assert r.stdout.strip() == "started"  # what came before the budget ran out is kept
    assert took < 5, f"a 1.5 s budget took {took:.1f} s"
    # as before: the remote command is not killed (no pty, no SIGHUP): a timed-out dpkg finishes, and the
    # next locked command waits for it. The same connection carries on.
    assert lab_transport.run(host, f"pgrep -f '^{probe}$' && pkill -f '^{probe}$'").ok


def test_lock_waits_for_a_holder(lab_transport, host):
    t = SshTransport()  # a second connection holds the lock for 2 s
    try:
        import threading

        holder = threading.Thread(target=lambda: t.run(host, "sleep 2", lock=True))
        holder.start()
        time.sleep(0.7)
        t0 = time.monotonic()
        r = lab_transport.run(host, "true", lock=True, timeout=30)
        waited = time.monotonic() - t0
        holder.join(10)
        assert r.ok and waited > 0.8, f"lock=True did not wait for the holder ({waited:.2f} s)"
    finally:
        t.close()


@pytest.mark.parametrize("rule, says", [("PASSWD: ALL", "a password is required"),
                                        ("NOPASSWD: !ALL", "is not allowed to execute")])
def test_sudo_refused_is_a_clear_error(lab_transport, host, rule, says):
    """sudo -n to a user the login user may not become (or only with a password): a TransportError that
    says so and what to do, never a silent rc 1."""
    dropin = "/etc/sudoers.d/zz-runbook-e2e"
    lab_transport.run(host, "id runbook-nosudo >/dev/null 2>&1 || useradd -M -s /bin/sh runbook-nosudo")
    assert lab_transport.run(host, f"echo '{host.user} ALL=(runbook-nosudo) {rule}' > {dropin} && "
                                   f"chmod 0440 {dropin} && visudo -c >/dev/null").ok
    try:
        with pytest.raises(TransportError, match=rf"cannot run commands as runbook-nosudo with `sudo -n` "
                                                 rf"\(.*{says}.*\); give it passwordless sudo"):
            lab_transport.run(host, "id -un", user="runbook-nosudo")
    finally:
        assert lab_transport.run(host, f"rm -f {dropin}; userdel runbook-nosudo").ok
