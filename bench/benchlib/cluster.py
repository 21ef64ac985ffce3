"""The 5-host bench cluster: its hosts, Patroni members, the writer table and a concurrent writer."""
from __future__ import annotations

import json
import subprocess
import threading
import time

from . import BenchFailed, ssh

HOSTS = [("b-etcd01", "192.168.64.141", "etcd"), ("b-etcd02", "192.168.64.142", "etcd"),
         ("b-etcd03", "192.168.64.143", "etcd"), ("b-node01", "192.168.64.131", "postgres"),
         ("b-node02", "192.168.64.132", "postgres")]


def inventory_hosts(inventory) -> list[tuple[str, str, str]]:
    """(name, address, first role) of every host of the inventory: what HOSTS is for the default lab."""
    from runbook.inventory import load_inventory

    return [(h.name, str(h.address), h.roles[0]) for h in load_inventory(inventory).hosts]


PATRONICTL = "/opt/patroni/bin/patronictl -c /etc/patroni/config.yml"
PSQL = "/usr/lib/postgresql/15/bin/psql -X -q -h /var/run/postgresql -d postgres"




# -- switchover / failover ---------------------------------------------------------------------
def members(a) -> list[dict]:
    from runbook.inventory import load_inventory

    for h in [x.name for x in load_inventory(a.inventory).postgres]:
        try:
            r = ssh(a.inventory, h, f"sudo -n -u postgres {PATRONICTL} list -f json", timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0 and r.stdout.strip():
            return json.loads(r.stdout)
    return []


def wait_healthy(a, budget: float = 180) -> tuple[dict, dict, float]:
    """Until one running leader and one streaming replica with lag 0; return (leader, replica, seconds)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < budget:
        ms = members(a)
        lead = [m for m in ms if m.get("Role") == "Leader" and m.get("State") == "running"]
        reps = [m for m in ms if m.get("State") == "streaming" and
                str(m.get("Lag in MB", m.get("Replay Lag", m.get("Receive Lag", 0)))) in ("0", "0.0")]
        if lead and reps:
            return lead[0], reps[0], time.monotonic() - t0
        time.sleep(1)
    raise BenchFailed(f"cluster not healthy (leader + streaming replica, lag 0) within {budget}s: {members(a)}")


def wait_sync_named(a, budget: float = 60) -> float:
    """Until Patroni names a streaming "Sync Standby" (what `patronictl switchover` needs); return seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < budget:
        if any(m.get("Role") == "Sync Standby" and m.get("State") == "streaming" for m in members(a)):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise BenchFailed(f"Patroni named no sync standby within {budget}s: {members(a)}")


def host_of(member: str) -> tuple[str, str]:
    name = member.removeprefix("patroni_")
    return name, dict((n, ad) for n, ad, _ in HOSTS)[name]


def ensure_table(a) -> None:
    lead, _, _ = wait_healthy(a)
    sql = ("CREATE TABLE IF NOT EXISTS bench_writes (at timestamptz DEFAULT clock_timestamp(), who text); "
           "GRANT SELECT, INSERT ON bench_writes TO admin;")
    r = ssh(a.inventory, host_of(lead["Member"])[0], f"sudo -n -u postgres {PSQL} -v ON_ERROR_STOP=1 -c \"{sql}\"")
    if r.returncode != 0:
        raise BenchFailed(f"creating bench_writes on the leader failed: {r.stderr}")


class Writer(threading.Thread):
    """INSERT every `interval` s through libpq multi-host target_session_attrs=read-write; reconnect on error."""

    def __init__(self, a, interval: float = 0.02):
        super().__init__(daemon=True)
        import yaml

        sec = yaml.safe_load((a.state / "secrets.yml").read_text())
        addrs = ",".join(ad for n, ad, r in HOSTS if r == "postgres")
        self.conninfo = (f"host={addrs} port=5432 dbname=postgres user={sec['admin']['username']} "
                         f"password={sec['admin']['password']} target_session_attrs=read-write sslmode=verify-ca "
                         f"sslrootcert={a.state / 'pki' / 'ca.crt'} connect_timeout=2 tcp_user_timeout=2000 "
                         "keepalives_idle=1 keepalives_interval=1 keepalives_count=2")
        self.interval = interval
        self.ok: list[tuple[float, str]] = []
        self.errors = 0
        self.err_at: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        import psycopg

        conn, who = None, ""
        while not self.halt.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.conninfo, autocommit=True)
                    who = conn.execute("select inet_server_addr()::text").fetchone()[0].split("/")[0]
                conn.execute("INSERT INTO bench_writes (who) VALUES (%s)", (who,))
                self.ok.append((time.monotonic(), who))
            except Exception:  # any libpq/psycopg error: count, reconnect
                self.errors += 1
                self.err_at.append(time.monotonic())
                try:
                    if conn is not None:
                        conn.close()
                except Exception:
                    pass
                conn = None
                self.halt.wait(0.05)
                continue
            self.halt.wait(self.interval)
        if conn is not None:
            conn.close()

    def __enter__(self):
        self.start()
        t = time.monotonic()
        while not self.ok:
            if time.monotonic() - t > 30:
                raise BenchFailed("the writer could not write for 30 s before the measurement")
            time.sleep(0.05)
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join(10)

    def _resumed(self, t0: float, new_addr: str | None) -> float | None:
        """Time of the first write on new_addr after t0; with new_addr None (failover: whoever leads),
        the first write after the first failed attempt after t0."""
        if new_addr is not None:
            return next((t for t, w in self.ok if t > t0 and w == new_addr), None)
        e = next((t for t in self.err_at if t > t0), None)
        return None if e is None else next((t for t, _ in self.ok if t > e), None)

    def figures(self, t0: float, new_addr: str | None) -> tuple[float, float | None, str]:
        """(longest gap between successful writes from t0 on, seconds from t0 to the resumed write, its host)."""
        ts = [t for t, _ in self.ok]
        before = [t for t in ts if t <= t0]
        seq = ([before[-1]] if before else []) + [t for t in ts if t > t0]
        gap = max((b - a for a, b in zip(seq, seq[1:], strict=False)), default=float("nan"))
        first = self._resumed(t0, new_addr)
        who = next((w for t, w in self.ok if t == first), "?")
        return gap, (None if first is None else first - t0), who

    def wait_new(self, new_addr: str | None, t0: float, budget: float) -> bool:
        end = time.monotonic() + budget
        while time.monotonic() < end:
            if self._resumed(t0, new_addr) is not None:
                time.sleep(1.0)  # a little steady state after the first write
                return True
            time.sleep(0.1)
        return False
