"""The lab as a whole: inventory -> running air-gapped hosts (and back to nothing).

Every operation is idempotent and repairs leftovers of a killed run; all waits are bounded.
Concurrent runs on one lab are serialised by a lock file (<runbook.lab_dir>/.lock).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tenacity

import fcntl
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from runbook.inventory import Host, Inventory
from runbook.lab import net
from runbook.inventory.distros import distro
from runbook.lab.base import ensure_base_tree
from runbook.lab.machine import Machine
from runbook.lab.net import LabError

SSH_WAIT = 60.0  # seconds for sshd to answer on every booted host
LOCK_WAIT = 600.0
Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def lab_root(root: Path | None = None) -> Path:
    """The lab's directory: *root* when given (the lab tasks pass runbook.lab_dir), else the project's
    runbook.lab_dir as invoke would configure it (invoke.yaml, INVOKE_RUNBOOK_LAB_DIR / _STATE_DIR)."""
    if root is not None:
        return root
    from runbook.inventory.settings import SettingsError, default_settings

    try:
        return default_settings().lab_dir
    except SettingsError as exc:
        raise LabError(str(exc)) from None


@contextmanager
def lab_lock(inv: Inventory, root: Path | None = None) -> Iterator[None]:
    d = lab_root(root)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another lab operation holds {d / '.lock'} for over {LOCK_WAIT:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def machine(inv: Inventory, host: Host, root: Path | None = None) -> Machine:
    return Machine.of(lab_root(root), host.name, host.address)


def _ssh_paths(inv: Inventory) -> tuple[Path, Path]:
    h = inv.hosts[0]
    if h.key is None or h.known_hosts is None:
        raise LabError(f"{inv.path}: the lab needs ssh.key and ssh.known_hosts (e.g. state/lab/id_ed25519 "
                       "and state/lab/known_hosts) so it can install the key and record host keys")
    return h.key, h.known_hosts


def ensure_lab_key(inv: Inventory, log: Log = _quiet) -> str:
    """The lab's ed25519 client key (generated if missing, 0600); return the public key line."""
    key, _ = _ssh_paths(inv)
    pub = key.with_name(key.name + ".pub")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        pub.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pg-ha-runbook-lab@{inv.cluster.name}",
                        "-f", str(key)], check=True, stdin=subprocess.DEVNULL)
        log(f"generated the lab key {key}")
    key.chmod(0o600)
    if not pub.exists():
        pub.write_text(subprocess.run(["ssh-keygen", "-y", "-f", str(key)], check=True, capture_output=True,
                                      text=True).stdout)
    return pub.read_text().strip()


def _kh_names(h: Host) -> list[str]:
    return [h.address, h.name] if h.port == 22 else [f"[{h.address}]:{h.port}", f"[{h.name}]:{h.port}"]


def update_known_hosts(inv: Inventory, hosts: list[Host], remove_only: bool = False,
                       root: Path | None = None) -> None:
    """Replace the lab hosts' lines in the inventory's known_hosts with their current host keys."""
    _, kh = _ssh_paths(inv)
    names = {n for h in hosts for n in _kh_names(h)}
    old = kh.read_text().splitlines() if kh.exists() else []
    keep = [ln for ln in old if not (ln.split() and set(ln.split()[0].split(",")) & names)]
    new = [] if remove_only else [f"{n} {k}" for h in hosts for k in machine(inv, h, root).host_keys()
                                  for n in _kh_names(h)]
    lines = sorted(set(keep + new))  # canonical: restarting one host rewrites nothing when its keys are known
    text = "\n".join(lines) + "\n" if lines else ""
    if not kh.exists() or kh.read_text() != text:
        kh.parent.mkdir(parents=True, exist_ok=True)
        tmp = kh.with_name(kh.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(kh)


def ssh_argv(inv: Inventory, h: Host, *command: str, batch: bool = True) -> list[str]:
    key, kh = _ssh_paths(inv)
    argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={kh}", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR", "-p", str(h.port)]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    return argv + [f"{h.user}@{h.address}", *command]


def port_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _last_result(state: "tenacity.RetryCallState") -> object:
    """After the last try: what it returned (a result retried for being falsy), never a RetryError."""
    return state.outcome.result() if state.outcome is not None else None


def wait_ssh(inv: Inventory, h: Host, timeout: float = SSH_WAIT, root: Path | None = None) -> float:
    """Bounded wait until sshd accepts TCP and then an ssh `true`; return the seconds waited.

    Retried: a closed port (False), a failing or hanging `ssh true` (its stderr / TimeoutExpired);
    nothing else is swallowed. Bounded by the deadline and by the attempt count."""
    import tenacity

    t0 = time.monotonic()

    def retrying(interval: float, attempts: int) -> tenacity.Retrying:
        left = max(0.0, timeout - (time.monotonic() - t0))
        return tenacity.Retrying(stop=tenacity.stop_after_delay(left) | tenacity.stop_after_attempt(attempts),
                                 wait=tenacity.wait_fixed(interval),
                                 retry=tenacity.retry_if_exception_type(subprocess.TimeoutExpired)
                                 | tenacity.retry_if_result(lambda ok: ok is not True),
                                 retry_error_callback=_last_result)

    if not retrying(0.2, int(timeout / 0.2) + 2)(port_open, h.address, h.port):
        raise LabError(f"{h.name}: sshd on {h.address}:{h.port} did not answer within {timeout:.0f} s; "
                       f"see {machine(inv, h, root).console}")

    def ssh_true() -> bool | str:
        p = subprocess.run(ssh_argv(inv, h, "true"), check=False, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=15)
        return True if p.returncode == 0 else (p.stderr.strip() or f"exit {p.returncode}")

    try:
        last = retrying(0.3, 200)(ssh_true)
    except subprocess.TimeoutExpired:
        last = "ssh timed out after 15 s"
    if last is True:
        return time.monotonic() - t0
    raise LabError(f"{h.name}: `ssh {h.user}@{h.address} true` still failing after {timeout:.0f} s: {last}")


def _parallel(fn, items: list) -> list:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        futures = [pool.submit(fn, i) for i in items]
    errors = [f.exception() for f in futures if f.exception()]
    if errors:
        raise LabError("\n".join(str(e) for e in errors)) from errors[0]
    return [f.result() for f in futures]


def _clean(m: Machine, log: Log) -> list[str]:
    """Repair a host that is not running: leftovers of a killed run go (the disk stays)."""
    stale = m.stale()
    if m.init_pid() is not None:
        m.hard_kill()
    m.umount()
    net.delete_host_net(m.name)
    m.pidfile.unlink(missing_ok=True)
    m.remove_cgroups()
    if stale:
        log(f"{m.name}: repaired ({'; '.join(stale)})")
    return stale


def _boot_one(inv: Inventory, h: Host, base: Path, pubkey: str, subnet, br: str, log: Log, root: Path) -> str:
    m = machine(inv, h, root)
    if m.running():
        if net.link_exists(net.veth_name(h.name)) and not net.link_is_up(net.veth_name(h.name)):
            net.set_partitioned(h.name, False)
            return "up (healed)"
        return "up"
    fresh = not m.upper.exists()
    stale = _clean(m, log)
    m.state.mkdir(parents=True, exist_ok=True)
    m.state.parent.chmod(0o700)
    m.state.chmod(0o700)
    m.mount(base)
    m.provision(h.user, pubkey, h.port)
    m.write_meta(bridge=br, inventory=str(inv.path))
    net.ensure_host_net(h.name, h.address, subnet, br)
    m.boot()
    return "created" if fresh else ("repaired" if stale else "started")


def up(inv: Inventory, names: list[str] | None = None, log: Log = _quiet, root: Path | None = None) -> dict[str, str]:
    """Bring the inventory's hosts (or NAMES) up; return {name: what happened}."""
    root = lab_root(root)
    hosts = [inv.get(n) for n in names] if names else list(inv.hosts)
    subnet = net.lab_subnet([h.address for h in inv.hosts])
    _ssh_paths(inv)
    with lab_lock(inv, root):
        # one base tree per distribution the hosts run (each host gets the one its os: names)
        bases = {o: ensure_base_tree(log=log, suite=distro(o).suite) for o in dict.fromkeys(h.os for h in hosts)}
        pubkey = ensure_lab_key(inv, log)
        br = net.ensure_bridge(subnet)
        booted = _parallel(lambda h: _boot_one(inv, h, bases[h.os], pubkey, subnet, br, log, root), hosts)
        result = dict(zip([h.name for h in hosts], booted, strict=True))
        update_known_hosts(inv, list(inv.hosts) if not names else hosts, root=root)
        _parallel(lambda h: wait_ssh(inv, h, root=root), hosts)
    return result


def _state_hosts(inv: Inventory, root: Path) -> list[Machine]:
    """Hosts with a state dir that are no longer in the inventory (lab.down still removes them)."""
    d = root / "hosts"
    known = set(inv.names())
    out = []
    for sub in sorted(d.iterdir()) if d.is_dir() else []:
        if sub.is_dir() and sub.name not in known:
            try:
                meta = json.loads((sub / "host.json").read_text())
            except (OSError, ValueError):
                meta = {}
            owner = meta.get("inventory")
            # the lab dir may hold other inventories' hosts; one whose inventory file is gone has no other owner
            if owner in (None, str(inv.path)) or not Path(owner).exists():
                out.append(Machine(sub.name, meta.get("address", ""), sub))
    return out


def _down_one(m: Machine, keep_disks: bool) -> str:
    stopped = m.stop()
    m.umount()
    net.delete_host_net(m.name)
    m.pidfile.unlink(missing_ok=True)
    m.remove_cgroups()
    if not keep_disks and m.state.exists():
        m.remove_disk()
        return "removed"
    return "stopped" if stopped else "down"


def down(inv: Inventory, keep_disks: bool = False, log: Log = _quiet, root: Path | None = None) -> dict[str, str]:
    """Stop every lab host, unmount, delete netns/links/bridge; drop the disks unless keep_disks."""
    root = lab_root(root)
    with lab_lock(inv, root):
        ms = [machine(inv, h, root) for h in inv.hosts] + _state_hosts(inv, root)
        bridges = {json.loads(m.meta.read_text()).get("bridge") for m in ms if m.meta.exists()}
        try:
            bridges.add(net.bridge_name(net.lab_subnet([h.address for h in inv.hosts])))
        except LabError:
            pass
        result = dict(zip([m.name for m in ms], _parallel(lambda m: _down_one(m, keep_disks), ms), strict=True))
        for br in sorted(b for b in bridges if b):
            if net.delete_bridge_if_unused(br):
                log(f"deleted bridge {br}")
            elif net.link_exists(br):
                log(f"bridge {br} kept: still has ports {', '.join(net.bridge_ports(br))}")
        if not keep_disks:
            update_known_hosts(inv, list(inv.hosts), remove_only=True, root=root)
            hosts_dir = root / "hosts"
            if hosts_dir.is_dir() and not any(hosts_dir.iterdir()):
                hosts_dir.rmdir()
    return result


def kill(inv: Inventory, name: str, log: Log = _quiet, root: Path | None = None) -> str:
    """Hard power-off: SIGKILL the container's init; its NIC goes away (netns deleted); disk kept."""
    h = inv.get(name)
    root = lab_root(root)
    with lab_lock(inv, root):
        m = machine(inv, h, root)
        killed = m.hard_kill()
        m.umount()
        net.delete_host_net(h.name)
        m.remove_cgroups()
    return "killed" if killed else "already off"


def start(inv: Inventory, name: str, log: Log = _quiet, root: Path | None = None) -> str:
    """Boot one host again on its existing disk and wait for sshd."""
    return up(inv, [name], log, root)[name]


def partition(inv: Inventory, name: str, cut: bool = True, root: Path | None = None) -> None:
    h = inv.get(name)
    if not machine(inv, h, root).running():
        raise LabError(f"{name} is not running; `inv lab.start {name}` first")
    net.set_partitioned(h.name, cut)


def host_state(inv: Inventory, h: Host, root: Path | None = None) -> tuple[str, float | None]:
    m = machine(inv, h, root)
    if m.running():
        veth = net.veth_name(h.name)
        if not net.link_is_up(veth):
            return "partitioned", m.uptime()
        return ("up" if port_open(h.address, h.port) else "booting"), m.uptime()
    stale = m.stale()
    if stale:
        return "stale: " + "; ".join(stale), None
    if m.upper.exists():
        return "off (disk kept)", None
    return "absent", None


def status(inv: Inventory, root: Path | None = None) -> list[tuple[str, str, str, float | None]]:
    root = lab_root(root)
    return [(h.name, h.address, *host_state(inv, h, root)) for h in inv.hosts]
