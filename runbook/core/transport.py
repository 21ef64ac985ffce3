"""Transports: how actions reach a host.

SshTransport: one Fabric connection per host per run, reused by every step (key, user, port and
sudo from the inventory; ~/.ssh/config honoured by Fabric; host keys checked against the
inventory's known_hosts - unknown keys are rejected). Commands run through `sudo -n`; file content
and secrets travel on stdin, never in argv. LocalTransport runs on the control machine.
"""
from __future__ import annotations

import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runbook.errors import RunbookError
from runbook.inventory import Host

if TYPE_CHECKING:
    from fabric import Connection


class TransportError(RunbookError):
    """The host could not be reached or authenticated; the message says which and what to do."""


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0


HOST_LOCK = "/run/lock/pg-ha-runbook.lock"


def wrap(host: Host, cmd: str, user: str = "root", lock: bool = False) -> str:
    """The command line for `cmd` run as `user` on `host` (sudo -n when the login user differs).

    lock: hold the host's runbook lock while it runs. A killed runbook's remote command keeps running
    (no pty, no SIGHUP); the resumed run's actions and checks wait for it instead of racing it."""
    sh = f"sh -c {shlex.quote(cmd)}"
    if lock:
        sh = f"flock -w 900 -E 75 {HOST_LOCK} {sh}"
    if user == host.user or (not host.sudo and user == "root"):
        return sh
    target = "" if user == "root" else f"-u {shlex.quote(user)} "
    return f"sudo -n -H {target}-- {sh}"


def put_command(path: str, mode: str, owner: str, group: str | None) -> str:
    """Atomic write of stdin to path with mode and owner (umask 077: no window where it is readable)."""
    p = shlex.quote(path)
    return (f"umask 077; d=$(dirname {p}); mkdir -p \"$d\"; t=$(mktemp \"$d/.runbook.XXXXXX\") && "
            f"cat > \"$t\" && chown {owner}:{group or owner} \"$t\" && chmod {mode} \"$t\" && mv -f \"$t\" {p}")


def stat_command(path: str) -> str:
    p = shlex.quote(path)
    return f"if [ -e {p} ]; then stat -c '%a %U %G' {p}; sha256sum {p} | cut -d' ' -f1; else echo missing; fi"


def parse_stat(out: str) -> tuple[str, str, str, str] | None:
    """'640 etcd etcd\\n<sha>' -> (mode '0640', owner, group, sha); None when missing."""
    lines = out.split()
    if not lines or lines[0] == "missing" or len(lines) < 4:
        return None
    return lines[0].zfill(4), lines[1], lines[2], lines[3]


class Transport:
    """The command boundary: everything a step does to a host goes through run() and put()."""

    def run(self, host: Host, cmd: str, *, user: str = "root", stdin: bytes | None = None,
            timeout: float = 900, lock: bool = False) -> Result:
        raise NotImplementedError

    def put(self, host: Host, path: str, content: bytes, *, mode: str = "0644", owner: str = "root",
            group: str | None = None) -> bool:
        """Write content if sha256/mode/owner differ; return True when the host changed."""
        import hashlib

        want = (mode.zfill(4), owner, group or owner, hashlib.sha256(content).hexdigest())
        r = self.run(host, stat_command(path), lock=True)
        if r.ok and parse_stat(r.stdout) == want:
            return False
        w = self.run(host, put_command(path, mode, owner, group), stdin=content, lock=True)
        if not w.ok:
            raise TransportError(f"{host.name}: writing {path} failed: {w.stderr.strip() or w.stdout.strip()}")
        return True

    def remote_sha256(self, host: Host, path: str) -> str | None:
        """The file's sha256, None when it is absent; a failed probe is an error, never 'absent'."""
        r = self.run(host, stat_command(path), lock=True)
        if not r.ok:
            raise TransportError(f"{host.name}: could not stat {path}: {r.stderr.strip() or f'exit {r.rc}'}")
        st = parse_stat(r.stdout)
        return st[3] if st else None

    def read(self, host: Host, path: str) -> str | None:
        r = self.run(host, f"cat {shlex.quote(path)}")
        return r.stdout if r.ok else None

    def upload(self, host: Host, src: Path, path: str, *, mode: str = "0644", owner: str = "root") -> None:
        raise NotImplementedError

    def warm(self, hosts: list[Host]) -> None:
        """Begin connecting to `hosts` in the background (a run that will need them all at once)."""

    def close(self) -> None:
        pass


BANNER_TRIES = 3  # a host that accepts TCP but sends no SSH banner in time (sshd starved of CPU): tries in all


def _open_with_banner_retries(connection, host: Host):
    """connection().open(), tried again (bounded: BANNER_TRIES, 1 s apart) only when the TCP connection was
    accepted but no SSH banner came within the timeout: a busy sshd, not a wrong host. Every other failure, and
    the last banner timeout, propagates at once."""
    import paramiko

    for attempt in range(1, BANNER_TRIES + 1):
        conn = connection()
        try:
            conn.open()
            return conn
        except paramiko.SSHException as exc:
            conn.close()
            if "protocol banner" not in str(exc):
                raise
            if attempt == BANNER_TRIES:
                raise paramiko.SSHException(
                    f"{exc} (no SSH banner within {host.connect_timeout:g} s, {BANNER_TRIES} tries: sshd is "
                    "busy, or OpenSSH 9.8 or later refuses this machine's address for a while after failed "
                    "logins from it (sshd_config PerSourcePenalties); it lifts by itself within minutes, or "
                    "restart sshd on the host)") from exc
            time.sleep(1)
    raise AssertionError("BANNER_TRIES < 1")  # the loop returns or raises


class SshTransport(Transport):
    def __init__(self) -> None:
        self._conns: dict[str, Connection] = {}
        self._failed: dict[str, TransportError] = {}  # a host that failed once fails fast for this run
        self._opening: dict[str, threading.Lock] = {}  # per host: held while its connection is opened
        self._config = None  # the Fabric configuration every connection shares (_fabric_config)
        self._host_keys: dict[Path, tuple] = {}  # known_hosts file -> (its stat, as parsed) (_known_hosts)
        self._mu = threading.Lock()
        self.bytes_sent = 0

    def _conn(self, host: Host):
        # One connection per host: two threads that need the same host at once (its --verify batch and a
        # lookup on it, e.g. the Patroni leader) share one handshake; other hosts connect meanwhile.
        with self._mu:
            opening = self._opening.setdefault(host.name, threading.Lock())
        with opening:
            with self._mu:
                if host.name in self._failed:
                    raise self._failed[host.name]
                c = self._conns.get(host.name)
                if c is not None:
                    t = c.client.get_transport()
                    if t is not None and t.is_active():
                        return c
                    del self._conns[host.name]  # the host rebooted or dropped us: connect again
            try:
                return self._open(host)
            except TransportError as exc:
                with self._mu:
                    self._failed[host.name] = exc
                raise

    def warm(self, hosts: list[Host]) -> None:
        """Open the hosts' connections in background threads while the run still prepares (--verify: every
        host is asked at once, first thing). A host that fails here fails the same way at its first command,
        which reports it; a command waits for the connection being opened (one handshake per host)."""
        def open_one(h: Host) -> None:
            try:
                self._conn(h)
            except Exception:  # noqa: BLE001 - reported by the host's first command (see _failed)
                pass

        for h in hosts:
            threading.Thread(target=open_one, args=(h,), name=f"connect-{h.name}", daemon=True).start()

    def _known_hosts(self, path: Path):
        """The known_hosts file, parsed once while it stays the same (its size, mtime and inode): paramiko's
        own loading of it is quadratic in its lines (each line is checked against every line before it), ~15 ms
        per connection for 30 hosts' keys. A file rewritten since (a host re-created and its new key recorded,
        e.g. by the lab) is parsed again."""
        import paramiko

        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._mu:
            got = self._host_keys.get(path)
            if got is None or got[0] != stamp:
                got = self._host_keys[path] = (stamp, paramiko.HostKeys(str(path)))
            return got[1]

    def _fabric_config(self):
        """One Fabric configuration (with ~/.ssh/config read once) for every connection of this run: a
        Connection without one builds its own, reading the invoke and SSH configuration files again."""
        from fabric import Config

        with self._mu:
            if self._config is None:
                self._config = Config()
            return self._config

    def forget_failures(self) -> None:
        """Let hosts that failed be tried again (a drill that restarts a host)."""
        with self._mu:
            self._failed.clear()

    def _open(self, host: Host):
        import paramiko
        from fabric import Connection

        kw: dict = {"look_for_keys": host.key is None, "allow_agent": host.key is None,
                    "banner_timeout": host.connect_timeout, "auth_timeout": host.connect_timeout}
        if host.key is not None:
            if not host.key.exists():
                raise TransportError(f"{host.name}: SSH key {host.key} does not exist (hosts.yml ssh.key); "
                                     "create it, or run `inv lab.up` for the lab")
            kw["key_filename"] = str(host.key)

        def connection() -> Connection:
            # the handshake's own wait (connect_timeout) outlasts banner_timeout, so that a silent sshd is
            # reported as such ("protocol banner") and not as a session that never started
            c = Connection(host.address, user=host.user, port=host.port, config=self._fabric_config(),
                           connect_timeout=int(host.connect_timeout) + 2, connect_kwargs=dict(kw))
            if not c.gateway:  # (a ProxyJump/ProxyCommand of ~/.ssh/config brings its own channel)
                c.connect_kwargs["sock"] = _tcp(c.host, c.port, int(host.connect_timeout) + 2)
            c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            if host.known_hosts is not None:  # this host's recorded keys (_known_hosts: parsed once)
                name = c.host if c.port == 22 else f"[{c.host}]:{c.port}"
                for ktype, key in (self._known_hosts(host.known_hosts).lookup(name) or {}).items():
                    c.client.get_host_keys().add(name, ktype, key)
            return c

        if host.known_hosts is not None and not host.known_hosts.exists():
            raise TransportError(f"{host.name}: known_hosts {host.known_hosts} does not exist "
                                 "(hosts.yml ssh.known_hosts); record the host keys first")
        kh = host.known_hosts or "~/.ssh/known_hosts"
        try:
            conn = _open_with_banner_retries(connection, host)
        except paramiko.BadHostKeyException as exc:
            raise TransportError(f"{host.name} ({host.address}): host key mismatch: the host's "
                                 f"{exc.key.get_name()} key differs from the one in {kh} (hosts.yml "
                                 "ssh.known_hosts); refused - the host was reinstalled or is not the one you "
                                 "mean. Verify its key out of band, then replace its line: "
                                 f"ssh-keygen -R {host.address} -f {kh}") from exc
        except paramiko.AuthenticationException as exc:
            raise TransportError(f"{host.name} ({host.address}): authentication as {host.user!r} failed "
                                 f"(key {host.key or 'agent / ~/.ssh'}): {exc}; check ssh.user and ssh.key in "
                                 f"hosts.yml and that the public key is in ~{host.user}/.ssh/authorized_keys "
                                 "on the host") from exc
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise TransportError(f"{host.name} ({host.address}): unknown host key: {host.address} is not in "
                                     f"{kh} (hosts.yml ssh.known_hosts); refused. Verify the host's key and add "
                                     f"it (ssh-keyscan {host.address} >> {kh}), or run `inv lab.up` for the "
                                     "lab") from exc
            raise TransportError(f"{host.name} ({host.address}): SSH refused: {exc}; check the host key in "
                                 f"{kh} and the key/user in hosts.yml") from exc
        except (OSError, socket.timeout) as exc:
            errors = getattr(exc, "errors", None) or {}  # paramiko's NoValidConnectionsError: the real causes
            why = "; ".join(sorted({e.strerror or str(e) for e in errors.values()})) or exc.strerror or str(exc)
            raise TransportError(f"{host.name} ({host.address}:{host.port}): unreachable: {why}; is the host up "
                                 f"and the address right (hosts.yml hosts.{host.name}.address)?") from exc
        with self._mu:
            self._conns[host.name] = conn
        return conn

    def run(self, host: Host, cmd: str, *, user: str = "root", stdin: bytes | None = None,
            timeout: float = 900, lock: bool = False) -> Result:
        t0 = time.monotonic()
        conn = self._conn(host)
        chan = conn.client.get_transport().open_session(timeout=host.connect_timeout)
        chan.exec_command(wrap(host, cmd, user, lock))
        out, err, timed_out = _exchange(chan, stdin, timeout)
        if stdin is not None:
            self.bytes_sent += len(stdin)
        if timed_out:
            return Result(124, out.decode(errors="replace"), f"timed out after {timeout}s", time.monotonic() - t0)
        rc = chan.recv_exit_status()
        chan.close()
        stderr = err.decode(errors="replace")
        denied = [ln for ln in stderr.splitlines() if ln.startswith(("sudo: ", "Sorry, user ")) and any(
            m in ln for m in ("a password is required", "not in the sudoers", "is not allowed to"))]
        if rc == 1 and denied and wrap(host, cmd, user).startswith("sudo "):
            raise TransportError(f"{host.name} ({host.address}): {host.user!r} cannot run commands as {user} with "
                                 f"`sudo -n` ({denied[0]}); give it passwordless sudo (e.g. "
                                 f"'{host.user} ALL=(ALL) NOPASSWD:ALL' in /etc/sudoers.d/), or set ssh.user "
                                 "(or the host's user) in hosts.yml to a user that has it")
        return Result(rc, out.decode(errors="replace"), stderr, time.monotonic() - t0)

    def upload(self, host: Host, src: Path, path: str, *, mode: str = "0644", owner: str = "root") -> None:
        """SFTP to a temp file in the login user's home, then sudo install into place."""
        conn = self._conn(host)
        tmp = f".runbook-upload-{Path(path).name}"
        sftp = conn.sftp()
        sftp.put(str(src), tmp)
        self.bytes_sent += src.stat().st_size
        home = self.run(host, "pwd", user=host.user).stdout.strip() or "."
        r = self.run(host, f"install -D -m {mode} -o {owner} -g {owner} {shlex.quote(home + '/' + tmp)} "
                           f"{shlex.quote(path)} && rm -f {shlex.quote(home + '/' + tmp)}", lock=True)
        if not r.ok:
            raise TransportError(f"{host.name}: installing {path} failed: {r.stderr.strip()}")

    def close(self) -> None:
        with self._mu:
            for c in self._conns.values():
                c.close()
            self._conns.clear()


class _AckingSocket(socket.socket):
    """A socket that ACKs what it reads at once (TCP_QUICKACK before each read): sshd sends a command's
    small replies (channel success, output, exit status) one after the other with Nagle's algorithm on, so
    each waits for our ACK of the one before, which Linux delays ~40 ms (a connection's first command took
    ~57 ms where it takes ~13 ms)."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return super().recv(bufsize, flags)


def _tcp(address: str, port: int, timeout: float) -> socket.socket:
    """The connection's TCP socket, with Nagle's algorithm off (TCP_NODELAY, as OpenSSH sets it): SSH sends
    small packets one after the other (a channel request, then stdin's end), and with Nagle's algorithm on each
    second one waits for the host's delayed ACK, ~40 ms: a command took ~50 ms where it takes ~7 ms. Where
    the system has TCP_QUICKACK (Linux), the socket also ACKs at once what the host sends (_AckingSocket)."""
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not hasattr(socket, "TCP_QUICKACK"):
        return sock
    acking = _AckingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    acking.settimeout(timeout)
    return acking


def _exchange(chan, stdin: bytes | None, timeout: float) -> tuple[bytes, bytes, bool]:
    """Feed stdin, read stdout and stderr to their end, wait for the exit status: (out, err, timed out).

    Blocking paramiko calls, no polling: stdin and stderr each have a thread (a command that fills one
    stream while the other is not read would stall), stdout is read here. The budget is one timer that
    closes the channel, which ends every read and write at once. Fabric's own runner is not used: it
    reads a non-terminal in_stream one byte per 10 ms and decodes it as text (binary stdin is altered),
    and it decodes output in 1000-byte chunks (a UTF-8 character across a chunk boundary is lost).
    """
    deadline = time.monotonic() + timeout
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        chan.close()

    def feed() -> None:
        try:
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
        except OSError:
            pass  # the command exited (or the budget closed the channel) before reading all of it

    errbuf: list[bytes] = []
    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    threads = [threading.Thread(target=feed, daemon=True),
               threading.Thread(target=lambda: errbuf.append(chan.makefile_stderr("rb").read()), daemon=True)]
    timer.start()
    try:
        for t in threads:
            t.start()
        try:
            out = chan.makefile("rb").read()
        except OSError:  # socket.timeout is an OSError
            out = b""
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        finished = chan.status_event.wait(max(0.0, deadline - time.monotonic()))
    finally:
        timer.cancel()
    if expired.is_set() or not finished:
        chan.close()
        return out, b"".join(errbuf), True
    return out, b"".join(errbuf), False


class LocalTransport(Transport):
    """The control machine (steps with role `local`)."""

    def run(self, host: Host, cmd: str, *, user: str = "root", stdin: bytes | None = None,
            timeout: float = 900, lock: bool = False) -> Result:
        t0 = time.monotonic()
        try:
            p = subprocess.run(["sh", "-c", cmd], input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out after {timeout}s", time.monotonic() - t0)
        return Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"),
                      time.monotonic() - t0)
