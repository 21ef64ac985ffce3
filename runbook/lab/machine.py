"""One lab host on this machine: an overlay disk over the base tree, provisioned like a freshly
installed bare server, booted with systemd-nspawn (real systemd) inside the host's netns.

State dir: <runbook.lab_dir>/hosts/<name>/{upper,work,root,console.log,nspawn.pid,host.json}
(runbook.lab_dir defaults to <state_dir>/lab).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from runbook.lab.net import LabError, netns_exists, netns_pids

CGROUP_GROUP = "pg-ha-lab"  # each container gets <hierarchy>/pg-ha-lab/<name>, never a shared one
STOP_TIMEOUT = 20.0  # orderly shutdown after SIGTERM to nspawn (~4 s measured)
KILL_TIMEOUT = 10.0


def _sh(*args: str, what: str) -> str:
    p = subprocess.run(list(args), check=False, capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"{what}: {' '.join(args)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p.stdout


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _start_time(pid: int) -> float | None:
    """Wall-clock start of a process (from /proc/PID/stat and the boot time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(x.split()[1]) for x in f if x.startswith("btime"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def cgroup_roots() -> list[Path]:
    """Hierarchies systemd-nspawn places a container in: cgroup2, and the legacy name=systemd one."""
    roots = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, fstype, opts = line.split()[:4]
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in opts.split(",")):
                roots.append(Path(mnt))
    return roots


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


@dataclass
class Machine:
    name: str
    address: str
    state: Path  # state/lab/hosts/<name>

    @classmethod
    def of(cls, root: Path, name: str, address: str = "") -> Machine:
        """Host *name* of the lab whose directory is *root* (runbook.lab_dir, default <state_dir>/lab)."""
        return cls(name, address, root / "hosts" / name)

    root = property(lambda s: s.state / "root")
    upper = property(lambda s: s.state / "upper")
    work = property(lambda s: s.state / "work")
    pidfile = property(lambda s: s.state / "nspawn.pid")
    console = property(lambda s: s.state / "console.log")
    meta = property(lambda s: s.state / "host.json")

    # -- what is there -------------------------------------------------------------------------
    def nspawn_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if _alive(pid) and cmd and cmd[0].endswith(b"systemd-nspawn") and self.name.encode() in cmd:
            return pid
        return None

    def init_pid(self) -> int | None:
        """The container's PID 1 (as seen from here): the process in the host's netns whose NSpid is 1."""
        for pid in netns_pids(self.name):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
            if len(nspid) > 1 and nspid[-1] == "1" and _alive(pid):
                return pid
        return None

    def mounted(self) -> bool:
        return str(self.root) in _mounts()

    def running(self) -> bool:
        return self.nspawn_pid() is not None and self.init_pid() is not None

    def uptime(self) -> float | None:
        pid = self.init_pid()
        start = _start_time(pid) if pid else None
        return None if start is None else max(0.0, time.time() - start)

    def stale(self) -> list[str]:
        """Leftovers of a killed run while the container is not running."""
        out = []
        if self.nspawn_pid() is None and self.init_pid() is not None:
            out.append("orphaned container init (nspawn gone)")
        if self.nspawn_pid() is None and self.pidfile.exists():
            out.append("dead nspawn pid")
        if not self.running() and self.mounted():
            out.append("overlay mounted without a container")
        if not self.running() and netns_exists(self.name) and not netns_pids(self.name):
            out.append("netns without a container")
        return out

    # -- disk ----------------------------------------------------------------------------------
    def mount(self, base: Path) -> None:
        if self.mounted():
            return
        for d in (self.upper, self.work, self.root):
            d.mkdir(parents=True, exist_ok=True)
        lower = self.state / "lower"
        if lower.exists() and lower.read_text().strip() != str(base):
            raise LabError(f"{self.name}: its disk was built on {lower.read_text().strip()} but the base tree "
                           f"is now {base}; run `inv lab.down` (drops the disks) and `inv lab.up`")
        lower.write_text(f"{base}\n")
        _sh("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={base},upperdir={self.upper},workdir={self.work}", str(self.root),
            what=f"{self.name}: mounting the overlay")

    def umount(self) -> None:
        for mp in sorted((m for m in _mounts() if m == str(self.root) or m.startswith(f"{self.root}/")),
                         key=len, reverse=True):
            _sh("umount", mp, what=f"{self.name}: unmounting {mp}")

    def provision(self, user: str, pubkey: str, port: int) -> None:
        """Make the overlay a freshly installed bare server named NAME (idempotent, before boot)."""
        r = self.root
        (r / "etc/hostname").write_text(f"{self.name}\n")
        if not (self.upper / "etc/hosts").exists():  # first boot only: a server keeps its /etc/hosts
            (r / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")
        resolv = r / "etc/resolv.conf"
        if resolv.is_symlink() or not resolv.exists() or resolv.read_text():
            resolv.unlink(missing_ok=True)
            resolv.write_text("")
        if not (self.upper / "etc/machine-id").exists():
            (r / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        if not (self.upper / "etc/ssh/ssh_host_ed25519_key").exists():  # the base's keys are shared
            for k in (r / "etc/ssh").glob("ssh_host_*"):
                k.unlink()
            _sh("chroot", str(r), "ssh-keygen", "-A", what=f"{self.name}: generating sshd host keys")
        if port != 22:
            (r / "etc/ssh/sshd_config.d/lab-port.conf").write_text(f"Port {port}\n")
        if b"PerSourcePenalties" in (r / "usr/sbin/sshd").read_bytes():  # OpenSSH >= 9.8 (Debian 13)
            # Every connection to a lab host comes from one address, this machine's. sshd's default penalties
            # would refuse that address for up to 10 minutes after a few failed logins (the bad-host tests fail
            # logins on purpose): every later run would then see "Error reading SSH protocol banner".
            (r / "etc/ssh/sshd_config.d/lab-penalties.conf").write_text(
                "# the lab: one client address for every test (runbook/lab/machine.py)\nPerSourcePenalties no\n")
        self._user(user, pubkey)

    def _user(self, user: str, pubkey: str) -> None:
        r = self.root
        if user != "root" and not any(ln.split(":")[0] == user for ln in (r / "etc/passwd").read_text().splitlines()):
            _sh("chroot", str(r), "useradd", "--create-home", "--user-group", "--shell", "/bin/bash", user,
                what=f"{self.name}: creating user {user}")
            _sh("chroot", str(r), "usermod", "-p", "*", user, what=f"{self.name}: unlocking {user} for keys")
        entry = next(ln.split(":") for ln in (r / "etc/passwd").read_text().splitlines()
                     if ln.split(":")[0] == user)
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
        if user != "root":
            sudoers = r / "etc/sudoers.d/lab-runbook"
            sudoers.write_text(f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
            sudoers.chmod(0o440)
        ssh_dir = r / home.lstrip("/") / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ak = ssh_dir / "authorized_keys"
        ak.write_text(pubkey.strip() + "\n")
        ak.chmod(0o600)
        for p in (ssh_dir, ak):
            os.chown(p, uid, gid)

    def host_keys(self) -> list[str]:
        """'TYPE BASE64' of the host's sshd keys, ed25519 first."""
        order = {"ssh-ed25519": 0, "ecdsa-sha2-nistp256": 1, "ssh-rsa": 2}
        keys = []
        for pub in sorted((self.upper / "etc/ssh").glob("ssh_host_*_key.pub")):
            parts = pub.read_text().split()
            if len(parts) >= 2:
                keys.append(f"{parts[0]} {parts[1]}")
        return sorted(keys, key=lambda k: order.get(k.split()[0], 9))

    def cgroups(self) -> list[Path]:
        return [r / CGROUP_GROUP / self.name for r in cgroup_roots()]

    def remove_cgroups(self) -> None:
        """rmdir the host's cgroup trees bottom-up (they hold no process once the container is gone)."""
        for top in self.cgroups():
            for _ in range(30):  # bounded: the kernel may take a moment to empty the last cgroup
                try:
                    for dirpath, _dirs, _files in os.walk(top, topdown=False):
                        os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise LabError(f"{self.name}: cannot remove cgroup {top}: still busy")
            try:
                top.parent.rmdir()  # the shared pg-ha-lab group, once no host uses it
            except OSError:
                pass

    # -- power ---------------------------------------------------------------------------------
    def boot(self) -> int:
        """Start systemd-nspawn detached (its own session, reparented to init); return its pid."""
        if not netns_exists(self.name):
            raise LabError(f"{self.name}: netns missing; cannot boot")
        self.pidfile.unlink(missing_ok=True)
        # --keep-unit puts the container under nspawn's own cgroup: without a cgroup per host, every
        # container's systemd would share (and remove) the same /payload/system.slice/... directories.
        self.remove_cgroups()
        script = ""
        for cg in self.cgroups():
            cg.mkdir(parents=True, exist_ok=True)
            script += f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))} && "
        script += f'echo $$ > {shlex.quote(str(self.pidfile))} && exec "$@"'
        cmd = ["setsid", "-f", "sh", "-c", script, "sh",
               "systemd-nspawn", "-D", str(self.root), "-b", "--register=no", "--keep-unit", "-M", self.name,
               f"--network-namespace-path=/run/netns/{self.name}", "--resolv-conf=off", "--timezone=off",
               "--link-journal=no", "--console=read-only",
               # keepalived adds and removes the floating address (VRRP): CAP_NET_ADMIN, confined to the
               # host's own network namespace (CAP_NET_RAW, for VRRP's raw socket, is nspawn's default)
               "--capability=CAP_NET_ADMIN"]
        with open(self.console, "ab") as log:
            log.write(f"\n==== lab boot {time.strftime('%F %T')} ====\n".encode())
            log.flush()
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.nspawn_pid()
            if pid and self.init_pid():
                return pid
            if pid is None and self.pidfile.exists():
                try:
                    written = int(self.pidfile.read_text().strip())
                except ValueError:
                    written = None  # being written right now
                if written and not _alive(written):
                    break  # nspawn already died
            time.sleep(0.05)
        tail = self.console.read_text(errors="replace")[-800:] if self.console.exists() else ""
        raise LabError(f"{self.name}: systemd-nspawn did not start a container; end of {self.console}:\n{tail}")

    def hard_kill(self) -> bool:
        """Power off hard: SIGKILL the container's init (the kernel then ends its PID namespace)."""
        init, nspawn = self.init_pid(), self.nspawn_pid()
        if init is None and nspawn is None:
            return False
        if init:
            os.kill(init, signal.SIGKILL)
        gone = [p for p in (init, nspawn) if p]
        if not _wait_gone(gone, KILL_TIMEOUT):
            if nspawn and _alive(nspawn):
                os.kill(nspawn, signal.SIGKILL)
            if not _wait_gone(gone, 2):
                raise LabError(f"{self.name}: container processes {gone} survived SIGKILL")
        self.pidfile.unlink(missing_ok=True)
        return True

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Orderly shutdown (SIGTERM to nspawn), bounded; then hard kill. False if it was not running."""
        nspawn, init = self.nspawn_pid(), self.init_pid()
        if nspawn is None and init is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        if nspawn:
            os.kill(nspawn, signal.SIGTERM)
            if _wait_gone([p for p in (nspawn, init) if p], timeout):
                self.pidfile.unlink(missing_ok=True)
                return True
        return self.hard_kill()

    def write_meta(self, **extra) -> None:
        self.meta.write_text(json.dumps({"name": self.name, "address": self.address, **extra}) + "\n")

    def remove_disk(self) -> None:
        if self.mounted():
            raise LabError(f"{self.name}: refusing to delete {self.state}: overlay still mounted")
        shutil.rmtree(self.state)
