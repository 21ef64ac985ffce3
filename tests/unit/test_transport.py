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


def test_a_silent_sshd_is_tried_again_bounded_then_named(inv, tmp_path):
    """A host that accepts TCP but sends no SSH banner in time (a busy sshd) is tried BANNER_TRIES times, then
    refused with a message that says so; a real loopback socket, no SSH server."""
    import socket
    import threading

    from runbook.core import transport

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        srv.settimeout(20)
        try:
            while len(accepted) < transport.BANNER_TRIES + 1:
                accepted.append(srv.accept()[0])  # and say nothing
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    (tmp_path / "key").write_text("not used before the banner\n")
    (tmp_path / "known_hosts").write_text("")
    h = inv.get("etcd01").model_copy(update=dict(address="127.0.0.1", port=srv.getsockname()[1],
                                                 connect_timeout=1.0, key=tmp_path / "key",
                                                 known_hosts=tmp_path / "known_hosts"))
    t = SshTransport()
    try:
        with pytest.raises(TransportError, match=r"no SSH banner within 1 s, 3 tries: sshd is busy, or .*Penalties"):
            t.run(h, "true")
        assert len(accepted) == transport.BANNER_TRIES
    finally:
        srv.close()
        for c in accepted:
            c.close()


def test_two_threads_that_need_one_host_share_one_handshake(inv, monkeypatch):
    """A --verify batch and a lookup on the same host (the Patroni leader) at once: one connection."""
    import threading
    import time

    opened = []

    class Conn:
        class client:  # noqa: N801 - the shape _conn reads
            @staticmethod
            def get_transport():
                class T:
                    def is_active(self):
                        return True
                return T()

    def slow_open(self, host):
        opened.append(host.name)
        time.sleep(0.2)  # a handshake in flight while the other thread asks
        with self._mu:
            self._conns[host.name] = Conn()
        return self._conns[host.name]

    monkeypatch.setattr(SshTransport, "_open", slow_open)
    t = SshTransport()
    h, other = inv.get("node01"), inv.get("etcd01")
    got = []
    threads = [threading.Thread(target=lambda x=x: got.append(t._conn(x))) for x in (h, h, other)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert sorted(opened) == ["etcd01", "node01"] and len(got) == 3


def test_warm_connects_in_the_background_and_a_failure_waits_for_the_first_command(inv, monkeypatch):
    import threading

    done = threading.Event()
    seen = []

    def refuse(self, host):
        seen.append(host.name)
        if len(seen) == 2:
            done.set()
        raise TransportError(f"{host.name}: unreachable (test)")

    monkeypatch.setattr(SshTransport, "_open", refuse)
    t = SshTransport()
    t.warm([inv.get("etcd01"), inv.get("etcd02")])  # no exception here
    assert done.wait(10)
    with pytest.raises(TransportError, match="etcd02: unreachable"):  # reported by the host's first command
        t.run(inv.get("etcd02"), "true")
    assert sorted(seen) == ["etcd01", "etcd02"]  # and not opened again


def test_the_ssh_socket_sends_without_nagle_delay():
    """TCP_NODELAY on the connection's socket: a command's small packets go out at once."""
    import socket

    from runbook.core.transport import _tcp

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        s = _tcp("127.0.0.1", srv.getsockname()[1], 5)
        peer, _ = srv.accept()
        try:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            if hasattr(socket, "TCP_QUICKACK"):  # Linux: what the host sends is ACKed at once, and still read
                assert type(s).__name__ == "_AckingSocket"
            peer.sendall(b"SSH-2.0-test\r\n")
            assert s.recv(64) == b"SSH-2.0-test\r\n"
            assert s.gettimeout() == 5
        finally:
            s.close()
            peer.close()
    finally:
        srv.close()


def test_known_hosts_is_read_once_and_each_connection_trusts_its_own_host_keys(inv, tmp_path, monkeypatch):
    """Parsed once per run (paramiko's own loading is quadratic in the file's lines); each connection gets the
    keys recorded for its own address (port 22: the address; another port: [address]:port), nothing else."""
    import socket

    import paramiko

    import runbook.core.transport as tr

    keys = {name: paramiko.ECDSAKey.generate() for name in ("a", "b", "c")}
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.9.0.1 {keys['a'].get_name()} {keys['a'].get_base64()}\n"
                  f"[10.9.0.2]:2222 {keys['b'].get_name()} {keys['b'].get_base64()}\n"
                  f"10.9.0.3 {keys['c'].get_name()} {keys['c'].get_base64()}\n")
    sshkey = tmp_path / "id"
    sshkey.write_text("unused: the handshake is not made here")
    base = inv.get("etcd01")
    hosts = [base.model_copy(update=dict(name=n, address=a, port=p, key=sshkey, known_hosts=kh))
             for n, a, p in (("x1", "10.9.0.1", 22), ("x2", "10.9.0.2", 2222), ("x4", "10.9.0.4", 22))]
    reads = []
    real = paramiko.HostKeys.load
    monkeypatch.setattr(paramiko.HostKeys, "load", lambda self, f: reads.append(f) or real(self, f))
    monkeypatch.setattr(tr, "_tcp", lambda address, port, timeout: socket.socketpair()[0])
    monkeypatch.setattr(tr, "_open_with_banner_retries", lambda connection, host: connection())  # no handshake
    t = tr.SshTransport()
    trusted = {h.name: {(n, k.get_base64()) for n, e in t._open(h).client.get_host_keys().items()
                        for k in e.values()} for h in hosts}
    assert reads == [str(kh)]
    assert trusted["x1"] == {("10.9.0.1", keys["a"].get_base64())}
    assert trusted["x2"] == {("[10.9.0.2]:2222", keys["b"].get_base64())}
    assert trusted["x4"] == set()  # unknown: refused at the handshake (RejectPolicy), as before
    # a host re-created during the run (the lab, a replacement) and its new key recorded: the file is read again
    new = paramiko.ECDSAKey.generate()
    kh.write_text(f"10.9.0.1 {new.get_name()} {new.get_base64()}\n")
    again = {k.get_base64() for e in t._open(hosts[0]).client.get_host_keys().values() for k in e.values()}
    assert again == {new.get_base64()} and reads == [str(kh), str(kh)]
