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
failover    `inv drill.failover` (runbook/procedures/drill.py), then a lab kill of the leader: same figures,
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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    CLUSTER,
    REPO,
    BenchFailed,
    checkpoints,
    fmt,
    host_sums,
    inv,
    inv_rss,
    kill_when,
    lab_down,
    lab_up,
    med,
    ssh,
    step_spans,
    use_inventory,
    write_inventory,
)
from benchlib.cluster import (  # noqa: E402
    HOSTS, PATRONICTL, Writer, ensure_table, host_of, inventory_hosts, wait_healthy, wait_sync_named)
from benchlib.phases import load_noop, phase_ansible, phase_probe  # noqa: E402
from benchlib.report import con, finish, record, say  # noqa: E402
from benchlib.targets import critical_path, target  # noqa: E402
from rich.markup import escape  # noqa: E402

BASE = Path("/tmp/bench-cluster")
PHASES = ["up", "noop", "ansible", "probe", "switchover", "failover", "resume"]


# -- phase: up ---------------------------------------------------------------------------------
def phase_up(a) -> dict[str, float]:
    say("recreating the lab (bare hosts) ...")
    t_lab = lab_up(a.inventory, fresh=True)
    record("lab", "lab.up of 5 bare hosts (cold, base tree cached)", f"{t_lab:.1f}s")
    shutil.rmtree(a.state / "pki", ignore_errors=True)
    name = CLUSTER["name"]
    for f in (f"{name}.db", f"{name}.db-wal", f"{name}.db-shm", "secrets.yml"):
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
    cp, chain = critical_path(rows, since=t_start)
    record("up", "critical path (declared needs, ledger durations)", f"{cp:.1f}s: {' > '.join(chain)}")
    if cp > 0:
        target("cluster.up from bare hosts: wall / critical path", r.wall / cp, 1.1)
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
    target("no-op cluster.up: median wall of inv", med(out["noop"]), 0.5, unit="s")
    record("memory", "peak RSS of inv, no-op cluster.up, 5 hosts", f"{max(rss['noop']) / 1024:.1f} MiB")
    record("memory", "peak RSS of inv, cluster.up --verify, 5 hosts", f"{max(rss['verify']) / 1024:.1f} MiB")
    (a.state.parent / "noop.json").write_text(json.dumps(out))
    return out


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
    return {"lead": lead, "rep": rep, "new": new_member, "cmd": t_cmd}


def phase_switchover(a) -> None:
    ensure_table(a)

    def inv_switch(lead, rep, w):
        r = inv(a.inventory, a.state, "patroni.switchover", "--force", timeout=600)
        m = re.search(r"switchover .*", r.out)
        return f"(inv says: {m.group(0).strip()})" if m else ""

    ours = measure(a, "switchover[inv]", inv_switch, lambda lead, rep: rep["Member"])
    _, _, t = wait_healthy(a)
    # inv returns once PostgreSQL waits for the old leader on commit; Patroni names it "Sync Standby" on its
    # leader's next HA cycle, and a plain `patronictl switchover` is refused until then: wait for that first
    t_named = wait_sync_named(a)
    record("switchover[inv]", "after the command, until Patroni named the sync standby", f"{t_named:.1f}s")

    def plain(lead, rep, w):
        h = host_of(lead["Member"])[0]
        r = ssh(a.inventory, h, f"sudo -n -u postgres {PATRONICTL} switchover {CLUSTER['name']} --leader "
                                f"{lead['Member']} --candidate {rep['Member']} --force", timeout=300)
        if r.returncode != 0:
            raise BenchFailed(f"patronictl switchover failed: {r.stdout} {r.stderr}")
        return ""

    theirs = measure(a, "switchover[patronictl]", plain, lambda lead, rep: rep["Member"])
    _, _, t = wait_healthy(a)
    record("switchover[patronictl]", "until the old leader streamed again (after the command)", f"{t:.1f}s")
    # issue 16 item 5: our command's own wall <= the plain command + until the old leader streams again + 2 s
    target("patroni.switchover wall - (patronictl wall + old leader streaming again)", ours["cmd"]
           - theirs["cmd"] - t, 2.0, unit="s")


def phase_failover(a) -> list[str]:
    """Returns functional failures (the drill's), after repairing the cluster so later phases can run."""
    from runbook.inventory import load_inventory
    from runbook.lab import lab

    failures: list[str] = []
    ensure_table(a)
    if (REPO / "runbook" / "procedures" / "drill.py").exists():
        lead, _, _ = wait_healthy(a)
        h = host_of(lead["Member"])[0]
        r = inv(a.inventory, a.state, "drill.failover", check=False, timeout=900, lab=True)
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

    # a replica Patroni has not named sync standby yet (right after a switchover) may not take over under
    # synchronous_mode_strict: the kill would measure that wait, not a failover
    wait_sync_named(a)
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
    use_inventory(a.inventory)
    HOSTS[:] = inventory_hosts(a.inventory)  # a private lab (--inventory) has its own names and addresses
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
        finish("bench/cluster_up.py", a, lab_down)
    return rc


if __name__ == "__main__":
    sys.exit(main())
