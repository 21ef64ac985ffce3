"""Benchmark the runbook on a private 5-host lab (not a test: it prints figures, asserts no time).

    .venv/bin/python bench/cluster_up.py [--inventory /tmp/bench-cluster/hosts.yml]
                                         [--state /tmp/bench-cluster/state] [--rounds 3] [--keep]
                                         [--phases up,noop,ansible,probe,switchover,failover,resume]

Default lab (generated): b-etcd01..03 at 192.168.64.141-143, b-node01..02 at 192.168.64.131-132,
state (lab key, ledger, PKI, secrets) in /tmp/bench-cluster/state. It never touches hosts.yml.

up          cluster.up from bare lab hosts (lab recreated): wall time, per-host sum of the ledger's
            checkpoints.duration, per-step wall spans, engine time outside steps
noop        cluster.up again (0 executed) and cluster.up --verify (every check runs), --rounds each,
            with the peak RSS of the inv process
ansible     the same checks as an Ansible playbook generated from the runbook's own step definitions
            (one shell task per step with a string check, become, on that step's hosts), same SSH
            key/user/known_hosts; wall time and ratios vs. the no-op runs (same run, same hosts)
probe       in-process: SSH round trips per no-op/--verify run, their latency, and what the
            always-checked steps (bundle.verify, bundle.push) cost on every run
switchover  `inv patroni.switchover --force` and a plain `patronictl switchover --force` over ssh, each
            with a concurrent writer: longest write gap, time until the new leader took a write
failover    `inv drill.failover` if runbook/drill.py exists, else a lab kill of the leader: same figures,
            then the old leader is booted again and timed until it streams
resume      lab recreated, cluster.up killed -9 mid-way (--kill-at), resumed: resumed wall time vs. the
            cost of the remaining steps in the uninterrupted `up` run
Exit code 1 only when something functionally fails (a command that must succeed did not).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (REPO, BenchFailed, checkpoints, fmt, host_sums, inv, inv_rss, kill_when, lab_down,  # noqa: E402
                      lab_up, med, now, ssh, step_spans, write_inventory)
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

con = Console(highlight=False, width=160)
BASE = Path("/tmp/bench-cluster")
HOSTS = [("b-etcd01", "192.168.64.141", "etcd"), ("b-etcd02", "192.168.64.142", "etcd"),
         ("b-etcd03", "192.168.64.143", "etcd"), ("b-node01", "192.168.64.131", "postgres"),
         ("b-node02", "192.168.64.132", "postgres")]
PHASES = ["up", "noop", "ansible", "probe", "switchover", "failover", "resume"]
PATRONICTL = "/opt/patroni/bin/patronictl -c /etc/patroni/config.yml"
PSQL = "/usr/lib/postgresql/15/bin/psql -X -q -h /var/run/postgresql -d postgres"
results: list[tuple[str, str, str]] = []  # (section, figure, value) for the final table


def say(msg: str) -> None:
    con.print(f"[dim]{now()}[/] {msg}")


def record(section: str, figure: str, value: str) -> None:
    results.append((escape(section), escape(figure), escape(value)))
    con.print(f"  [bold]{escape(section)}[/] {escape(figure)}: {escape(value)}")


# -- phase: up ---------------------------------------------------------------------------------
def phase_up(a) -> dict[str, float]:
    say("recreating the lab (bare hosts) ...")
    t_lab = lab_up(a.inventory, fresh=True)
    record("lab", "lab.up of 5 bare hosts (cold, base tree cached)", f"{t_lab:.1f}s")
    shutil.rmtree(a.state / "pki", ignore_errors=True)
    for f in ("patroni_cluster.db", "patroni_cluster.db-wal", "patroni_cluster.db-shm", "secrets.yml"):
        (a.state / f).unlink(missing_ok=True)
    say("cluster.up from bare hosts ...")
    t_start = time.time()
    r = inv(a.inventory, a.state, "cluster.up", timeout=2400)
    rows = checkpoints(a.state)
    spans = step_spans(rows, since=t_start)
    record("up", "cluster.up from bare hosts: wall", f"{r.wall:.1f}s ({r.executed} (host, step) executed)")
    for h, s in host_sums(rows).items():
        record("up", f"sum of step durations on {h}", f"{s:.1f}s")
    record("up", "sum of per-step wall spans (steps run one after another)", f"{sum(spans.values()):.1f}s")
    record("up", "wall outside any step (start-up, decisions, between steps)", f"{r.wall - sum(spans.values()):.1f}s")
    top = sorted(spans.items(), key=lambda kv: -kv[1])[:6]
    record("up", "slowest steps (wall span)", ", ".join(f"{k} {v:.1f}s" for k, v in top))
    (a.state.parent / "up-spans.json").write_text(json.dumps({"wall": r.wall, "spans": spans}, indent=1))
    return spans


# -- phase: noop -------------------------------------------------------------------------------
def phase_noop(a) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"noop": [], "verify": []}
    rss: dict[str, list[int]] = {"noop": [], "verify": []}
    for i in range(a.rounds):
        r = inv_rss(a.inventory, a.state, "cluster.up")
        if r.executed != 0:
            raise BenchFailed(f"no-op cluster.up executed {r.executed} (host, step):\n{r.out[-2000:]}")
        out["noop"].append(r.wall)
        rss["noop"].append(r.maxrss_kb)
        v = inv_rss(a.inventory, a.state, "cluster.up", "--verify")
        if v.executed != 0:
            say(f"[yellow]--verify re-ran {v.executed} drifted (host, step)[/]: {v.out[-800:]}")
        out["verify"].append(v.wall)
        rss["verify"].append(v.maxrss_kb)
        say(f"round {i + 1}: no-op {r.wall:.2f}s, --verify {v.wall:.2f}s")
    record("noop", "no-op cluster.up (0 executed): wall", fmt(out["noop"]))
    record("noop", "no-op cluster.up --verify (every check): wall", fmt(out["verify"]))
    record("memory", "peak RSS of inv, no-op cluster.up, 5 hosts", f"{max(rss['noop']) / 1024:.1f} MiB")
    record("memory", "peak RSS of inv, cluster.up --verify, 5 hosts", f"{max(rss['verify']) / 1024:.1f} MiB")
    (a.state.parent / "noop.json").write_text(json.dumps(out))
    return out


def load_noop(a) -> dict[str, list[float]] | None:
    p = a.state.parent / "noop.json"
    return json.loads(p.read_text()) if p.exists() else None


# -- phase: ansible ----------------------------------------------------------------------------
def make_ctx(a):
    from runbook.context import Ctx, Options
    from runbook.inventory import load_inventory
    from runbook.transport import SshTransport

    return Ctx(inventory=load_inventory(a.inventory), transport=SshTransport(), state_dir=a.state,
               bundle_dir=REPO / "bundle", options=Options())


def q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def generate_ansible(a, d: Path) -> tuple[Path, Path, int, list[str]]:
    """Inventory + playbook: for each runbook step with a string check, a shell task with that
    check (per host, as host vars tagged !unsafe so Jinja never touches them) on that step's hosts."""
    from runbook.engine import targets
    from runbook.sections import all_steps

    ctx = make_ctx(a)
    i = ctx.inventory
    key, kh = i.hosts[0].key, i.hosts[0].known_hosts
    hostvars: dict[str, list[str]] = {h.name: [] for h in i.hosts}
    tasks, skipped = [], []
    for n, step in enumerate(all_steps()):
        hosts = targets(ctx, step, list(i.hosts))
        if step.role == "local" or step.check_fn is None:
            skipped.append(f"{step.name} ({'local' if step.role == 'local' else 'no check'})")
            continue
        var = f"rb_check_{n:02d}"
        for h in hosts:
            hostvars[h.name].append(f"        {var}: !unsafe {q(step.check_fn(ctx, h))}")
        tasks.append(f"    - name: {q(step.name + ' (check)')}\n"
                     f"      ansible.builtin.shell: \"{{{{ {var} }}}}\"\n"
                     f"      when: {var} is defined\n      changed_when: false\n      ignore_errors: true\n")
    ctx.transport.close()
    lines = ["all:", "  vars:", f"    ansible_user: {i.hosts[0].user}",
             f"    ansible_ssh_private_key_file: {key}",
             "    ansible_ssh_common_args: "
             + q(f"-o UserKnownHostsFile={kh} -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes"),
             "    ansible_python_interpreter: /usr/bin/python3", "  hosts:"]
    for h in i.hosts:
        lines.append(f"    {h.name}:\n      ansible_host: {h.address}\n      ansible_port: {h.port}")
        lines += [ln[2:] for ln in hostvars[h.name]]
    inv_path = d / "inventory.yml"
    inv_path.write_text("\n".join(lines) + "\n")
    pb = d / "noop-checks.yml"
    pb.write_text("# generated by bench/cluster_up.py from runbook.sections.all_steps(): the runbook's checks\n"
                  "- name: pg-ha-runbook no-op checks\n  hosts: all\n  gather_facts: false\n  become: true\n"
                  "  tasks:\n" + "".join(tasks))
    return inv_path, pb, len(tasks), skipped


def run_ansible(inv_path: Path, pb: Path, d: Path, forks: int, pipelining: bool, rnd: int) -> tuple[float, dict]:
    cp = d / f"cp-{'p' if pipelining else 'd'}-{rnd}-{time.time_ns()}"  # fresh ControlPath: cold like paramiko
    cp.mkdir(parents=True)
    e = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_FORKS=str(forks), ANSIBLE_NOCOLOR="1",
             ANSIBLE_PIPELINING=str(pipelining), ANSIBLE_HOME=str(d / "home"), ANSIBLE_SSH_CONTROL_PATH_DIR=str(cp),
             ANSIBLE_LOCAL_TEMP=str(d / "tmp"), ANSIBLE_RETRY_FILES_ENABLED="False", ANSIBLE_STDOUT_CALLBACK="default")
    t0 = time.monotonic()
    p = subprocess.run([str(REPO / ".venv/bin/ansible-playbook"), "-i", str(inv_path), str(pb)], env=e,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    wall = time.monotonic() - t0
    recap = {}
    for m in re.finditer(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
                         r"\s+rescued=(\d+)\s+ignored=(\d+)", p.stdout, re.M):
        recap[m.group(1)] = dict(zip(("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored"),
                                     map(int, m.groups()[1:]), strict=True))
    bad = {h: r for h, r in recap.items() if r["unreachable"] or r["failed"] or r["ignored"]}
    if p.returncode != 0 or bad or len(recap) != 5:
        fails = re.findall(r"^(fatal|failed): .*$", p.stdout, re.M)
        raise BenchFailed(f"ansible-playbook rc {p.returncode}, problems {bad}\n{p.stdout[-3000:]}\n"
                          f"{p.stderr[-1500:]}" + "\n".join(fails[:5]))
    return wall, recap


def phase_ansible(a, noop: dict[str, list[float]] | None) -> None:
    d = a.state.parent / "ansible"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    inv_path, pb, ntasks, skipped = generate_ansible(a, d)
    say(f"ansible: {ntasks} check tasks in {pb} (not translated: {', '.join(skipped)})")
    walls: dict[str, list[float]] = {"default": [], "pipelining": []}
    rb: dict[str, list[float]] = {"noop": [], "verify": []}
    checks = 0
    for rnd in range(a.rounds):
        # interleaved with the runbook's own runs, so both see the same machine load
        r = inv(a.inventory, a.state, "cluster.up")
        v = inv(a.inventory, a.state, "cluster.up", "--verify")
        rb["noop"].append(r.wall)
        rb["verify"].append(v.wall)
        w, recap = run_ansible(inv_path, pb, d, 16, False, rnd)
        walls["default"].append(w)
        wp, _ = run_ansible(inv_path, pb, d, 16, True, rnd)
        walls["pipelining"].append(wp)
        checks = sum(x["ok"] for x in recap.values())
        say(f"round {rnd + 1}: runbook no-op {r.wall:.2f}s, --verify {v.wall:.2f}s, ansible {w:.2f}s, "
            f"ansible+pipelining {wp:.2f}s")
    record("ansible", f"ansible-playbook ({ntasks} tasks, {checks} host checks ok, forks 16): wall",
           fmt(walls["default"]))
    record("ansible", "ansible-playbook with pipelining=True: wall", fmt(walls["pipelining"]))
    record("ansible", "runbook no-op cluster.up, same rounds: wall", fmt(rb["noop"]))
    record("ansible", "runbook cluster.up --verify, same rounds: wall", fmt(rb["verify"]))
    for k in ("default", "pipelining"):
        record("ansible", f"ratio ansible[{k}] / runbook --verify", f"{med(walls[k]) / med(rb['verify']):.2f}x")
        record("ansible", f"ratio ansible[{k}] / runbook no-op", f"{med(walls[k]) / med(rb['noop']):.2f}x")
    record("ansible", "not translated (no remote check)", ", ".join(skipped))


# -- phase: probe ------------------------------------------------------------------------------
def phase_probe(a) -> None:
    """In-process: the engine's own apply() with a transport that counts and times each SSH exec."""
    from runbook.bundle.manifest import verify_bundle
    from runbook.engine import apply
    from runbook.ledger import Ledger
    from runbook.sections import all_steps
    from runbook.transport import SshTransport

    class Counting(SshTransport):
        def __init__(self):
            super().__init__()
            self.calls: list[tuple[str, float, str]] = []
            self.connects: list[tuple[str, float]] = []

        def _conn(self, host):
            fresh = host.name not in self._conns
            t = time.monotonic()
            c = super()._conn(host)
            if fresh:
                self.connects.append((host.name, time.monotonic() - t))
            return c

        def run(self, host, cmd, **kw):
            t = time.monotonic()
            r = super().run(host, cmd, **kw)
            self.calls.append((host.name, time.monotonic() - t, cmd))
            return r

    for verify in (False, True):
        ctx = make_ctx(a)
        ctx.transport = Counting()
        ctx.options.verify = verify
        ctx.ledger = Ledger(a.state / "patroni_cluster.db", redact=ctx.redact)
        per_step: dict[str, float] = {}
        t0 = time.monotonic()
        for step in all_steps():
            ts = time.monotonic()
            rep = apply(ctx, [step], list(ctx.inventory.hosts))
            if rep.executed:
                say(f"[yellow]probe: {step.name} re-ran on {rep.executed}[/]")
            per_step[step.name] = time.monotonic() - ts
        total = time.monotonic() - t0
        calls = ctx.transport.calls
        ctx.transport.close()
        ctx.ledger.db.conn.close()
        label = "--verify" if verify else "no-op"
        hosts = sorted({c[0] for c in calls})
        record("probe", f"in-process {label} apply(): wall / SSH execs / connects", f"{total:.2f}s / {len(calls)} "
               f"({', '.join(f'{h} {sum(1 for c in calls if c[0] == h)}' for h in hosts)}) / "
               f"{len(ctx.transport.connects)} (mean connect {med([c[1] for c in ctx.transport.connects]):.3f}s)")
        if calls:
            lat = sorted(c[1] for c in calls)
            record("probe", f"{label}: SSH exec latency",
                   f"median {med(lat) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms, sum {sum(lat):.2f}s "
                   f"(sum close to the wall: decide() runs the checks one host after another)")
        top = sorted(per_step.items(), key=lambda kv: -kv[1])[:5]
        record("probe", f"{label}: costliest steps", ", ".join(f"{k} {v:.2f}s" for k, v in top))
    t = time.monotonic()
    verify_bundle(REPO / "bundle")
    record("probe", "bundle.verify (always_check, local): re-hash of the 109 MB bundle on every run",
           f"{time.monotonic() - t:.2f}s")
    t = time.monotonic()
    r = ssh(a.inventory, "b-node01", "sudo -n sha256sum --quiet -c /opt/runbook-bundle/SHA256SUMS")
    record("probe", "bundle.push check on one postgres host (sha256sum -c of ~87 MB), OpenSSH incl. connect",
           f"{time.monotonic() - t:.2f}s (rc {r.returncode})")
    # one SSH round trip, paramiko (the runbook's transport) vs. OpenSSH
    ctx = make_ctx(a)
    h = ctx.inventory.get("b-node01")
    ctx.transport.run(h, "true")
    lat = []
    for _ in range(20):
        t = time.monotonic()
        ctx.transport.run(h, "true")
        lat.append(time.monotonic() - t)
    lat_user = []
    for _ in range(20):
        t = time.monotonic()
        ctx.transport.run(h, "true", user=h.user)
        lat_user.append(time.monotonic() - t)
    ctx.transport.close()
    record("probe", "paramiko exec `sudo -n sh -c true` on an open connection (x20)",
           f"median {med(lat) * 1000:.0f} ms")
    record("probe", "paramiko exec `sh -c true` (no sudo) on an open connection (x20)",
           f"median {med(lat_user) * 1000:.0f} ms")
    o = []
    for _ in range(5):
        t = time.monotonic()
        ssh(a.inventory, "b-node01", "true")
        o.append(time.monotonic() - t)
    record("probe", "OpenSSH `ssh host true` incl. connect and auth (x5)", f"median {med(o) * 1000:.0f} ms")


# -- switchover / failover ---------------------------------------------------------------------
def members(a) -> list[dict]:
    for h in ("b-node01", "b-node02"):
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


def measure(a, label: str, action, new_member_of, budget: float = 120) -> dict:
    """new_member_of(lead, rep) -> the member expected to lead after `action`, or None: whoever leads."""
    lead, rep, _ = wait_healthy(a)
    new_member = new_member_of(lead, rep)
    new_addr = host_of(new_member)[1] if new_member else None
    with Writer(a) as w:
        t0 = time.monotonic()
        info = action(lead, rep, w)
        t_cmd = time.monotonic() - t0
        ok = w.wait_new(new_addr, t0, budget)
    gap, first, who = w.figures(t0, new_addr)
    if not ok:
        raise BenchFailed(f"{label}: no write reached {new_member or 'a leader'} within {budget}s after the command")
    record(label, f"{lead['Member']} -> {new_member or 'whoever leads'}: command wall",
           f"{t_cmd:.2f}s {info or ''}".strip())
    record(label, "longest gap seen by the writer (50 inserts/s)", f"{gap:.2f}s ({w.errors} failed attempts)")
    record(label, "until a write succeeded on the new leader", f"{first:.2f}s (on {who})")
    return {"lead": lead, "rep": rep, "new": new_member}


def phase_switchover(a) -> None:
    ensure_table(a)

    def inv_switch(lead, rep, w):
        r = inv(a.inventory, a.state, "patroni.switchover", "--force", timeout=600)
        m = re.search(r"switchover .*", r.out)
        return f"(inv says: {m.group(0).strip()})" if m else ""

    measure(a, "switchover[inv]", inv_switch, lambda lead, rep: rep["Member"])
    _, _, t = wait_healthy(a)

    def plain(lead, rep, w):
        h = host_of(lead["Member"])[0]
        r = ssh(a.inventory, h, f"sudo -n -u postgres {PATRONICTL} switchover patroni_cluster --leader "
                                f"{lead['Member']} --candidate {rep['Member']} --force", timeout=300)
        if r.returncode != 0:
            raise BenchFailed(f"patronictl switchover failed: {r.stdout} {r.stderr}")
        return ""

    measure(a, "switchover[patronictl]", plain, lambda lead, rep: rep["Member"])
    _, _, t = wait_healthy(a)
    record("switchover[patronictl]", "until the old leader streamed again (after the command)", f"{t:.1f}s")


def phase_failover(a) -> list[str]:
    """Returns functional failures (the drill's), after repairing the cluster so later phases can run."""
    from runbook.inventory import load_inventory
    from runbook.lab import lab

    failures: list[str] = []
    ensure_table(a)
    if (REPO / "runbook" / "drill.py").exists():
        lead, _, _ = wait_healthy(a)
        h = host_of(lead["Member"])[0]
        r = inv(a.inventory, a.state, "drill.failover", check=False, timeout=900)
        (a.state.parent / "drill-failover.txt").write_text(r.out + r.err)
        figs = re.findall(r"│ ([^│]*?) +│ +([^│]*?) │", r.out)
        keep = ("promoted", "writable", "gap", "streaming", "boot")
        said = "; ".join(f"{k.strip()} {v.strip()}" for k, v in figs if any(x in k for x in keep))
        record("failover[inv drill]", f"inv drill.failover (kills {h}): wall, rc", f"{r.wall:.1f}s, rc {r.rc}: {said}")
        if r.rc != 0:
            failures.append(f"inv drill.failover exited {r.rc}: {(r.out + r.err).strip().splitlines()[-1]}")
            repair(a, h, "failover[inv drill]")

    def do_fail(lead, rep, w):
        h = host_of(lead["Member"])[0]
        survivor = host_of(rep["Member"])[0]
        lab.kill(load_inventory(a.inventory), h)
        t_kill = time.monotonic()
        promoted = None
        while time.monotonic() - t_kill < 90 and promoted is None:  # Patroni's TTL decides
            r = ssh(a.inventory, survivor, f"sudo -n -u postgres {PATRONICTL} list -f json", timeout=30)
            if r.returncode == 0 and any(m.get("Role") == "Leader" and m["Member"] == rep["Member"]
                                         for m in json.loads(r.stdout or "[]")):
                promoted = time.monotonic() - t_kill
            else:
                time.sleep(0.5)
        # with synchronous_mode_strict the new primary's commits wait for a sync standby: boot the old
        # leader if no write arrived within 15 s of the promotion (as drill.failover's --write-wait)
        early = w.wait_new(None, t_kill, 15)
        lab.start(load_inventory(a.inventory), h)
        repair(a, h, "failover[lab kill]")
        p = f"{promoted:.1f}s" if promoted is not None else "not within 90 s"
        return f"(lab kill {h}; {rep['Member']} leader after {p}; writes before the old leader was back: {early}; "\
               "then boot + repair)"

    measure(a, "failover[lab kill]", do_fail, lambda lead, rep: None, budget=300)
    _, _, t = wait_healthy(a, budget=300)
    record("failover[lab kill]", "after the command: until both members healthy again", f"{t:.1f}s")
    return failures


def repair(a, h: str, label: str) -> None:
    """lab.start re-provisions /etc/hosts (the runbook's names block is gone): `cluster.up --verify --hosts H`."""
    etc = ssh(a.inventory, h, "grep -c pg-ha-runbook /etc/hosts || true").stdout.strip()
    r = inv(a.inventory, a.state, "cluster.up", "--verify", "--hosts", h, timeout=900)
    record(label, f"{h} after boot: runbook lines in /etc/hosts = {etc}; repair `cluster.up --verify --hosts {h}`",
           f"{r.wall:.1f}s, {r.executed} (host, step) re-run")


# -- phase: resume -----------------------------------------------------------------------------
def phase_resume(a, ref: dict | None) -> None:
    state = a.state.parent / "state-resume"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o700)
    say("resume: recreating the lab (bare hosts) ...")
    lab_up(a.inventory, fresh=True)
    sql = f"select 1 from checkpoints where step = '{a.kill_at}' and status = 'running'"
    say(f"resume: cluster.up, kill -9 when {a.kill_at} is running ...")
    t_kill = kill_when(a.inventory, state, ["cluster.up"], sql, budget=1500)
    done_before = {(r["host"], r["step"]) for r in checkpoints(state) if r["status"] == "done"}
    t_start = time.time()
    r = inv(a.inventory, state, "cluster.up", timeout=2400)
    rows = checkpoints(state)
    spans = step_spans(rows, since=t_start)
    record("resume", f"killed -9 after {t_kill:.1f}s (at {a.kill_at} running), done before the kill",
           f"{len(done_before)} (host, step)")
    record("resume", "resumed cluster.up: wall", f"{r.wall:.1f}s ({r.executed} (host, step) executed)")
    record("resume", "  its own step spans (sum) / wall outside steps",
           f"{sum(spans.values()):.1f}s / {r.wall - sum(spans.values()):.1f}s")
    if ref:
        remaining = sum(v for k, v in ref["spans"].items() if k in spans)
        record("resume", "  the same steps in the uninterrupted `up` run (sum of spans)", f"{remaining:.1f}s")
        record("resume", "  resume overhead = resumed wall - that", f"{r.wall - remaining:+.1f}s")
    shutil.rmtree(state, ignore_errors=True)


# -- main --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inventory", type=Path, default=BASE / "hosts.yml",
                    help="inventory of the private lab (default: generated b-* hosts in /tmp/bench-cluster)")
    ap.add_argument("--state", type=Path, default=BASE / "state", help="runbook state dir (ledger, PKI, secrets)")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of each no-op figure")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--kill-at", default="patroni.wheels", help="resume: kill -9 while this step is running")
    ap.add_argument("--keep", action="store_true", help="keep the lab (and its cluster) at the end")
    a = ap.parse_args()
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        con.print("the lab needs root")
        return 2
    a.inventory, a.state = a.inventory.resolve(), a.state.resolve()
    if a.inventory == (REPO / "hosts.yml").resolve():
        con.print("[red]refusing the shared hosts.yml lab: pass a private inventory[/]")
        return 2
    if a.inventory == (BASE / "hosts.yml") and not a.inventory.exists():
        write_inventory(a.inventory, HOSTS)
    a.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    con.print(f"inventory {a.inventory}, state {a.state}, phases {','.join(phases)}, rounds {a.rounds}; "
              f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rc = 0
    ref = None
    failures: list[str] = []
    try:
        if "up" in phases:
            phase_up(a)
        else:
            lab_up(a.inventory, fresh=False)
        p = a.state.parent / "up-spans.json"
        ref = json.loads(p.read_text()) if p.exists() else None
        noop = phase_noop(a) if "noop" in phases else load_noop(a)
        if "ansible" in phases:
            phase_ansible(a, noop)
        if "probe" in phases:
            phase_probe(a)
        if "switchover" in phases:
            phase_switchover(a)
        if "failover" in phases:
            failures += phase_failover(a)
        if "resume" in phases:
            phase_resume(a, ref)
        for f in failures:
            con.print(f"[red]functional failure:[/] {escape(f)}")
            rc = 1
    except BenchFailed as exc:
        con.print(f"[red]functional failure:[/] {escape(str(exc))}")
        rc = 1
    finally:
        t = Table(title=f"bench/cluster_up.py on {a.inventory} (load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)",
                  title_justify="left")
        for c in ("section", "figure", "value"):
            t.add_column(c)
        for row in results:
            t.add_row(*row)
        con.print(t)
        if not a.keep:
            say("tearing the lab down (inv lab.down) ...")
            lab_down(a.inventory, a.state)
    return rc


if __name__ == "__main__":
    sys.exit(main())
