"""`inv` as the operator runs it: a bad inventory or a bad --hosts fails before anything connects or
anything is recorded, and every task explains itself (`inv --help TASK`).

Each run gets INVOKE_RUNBOOK_INVENTORY (a corpus file: TEST-NET / lab addresses only) and
INVOKE_RUNBOOK_STATE_DIR (under tmp_path). A `sitecustomize` put on PYTHONPATH installs an audit hook
in the `inv` process that logs every socket connect / name lookup to a file: "no connection is
attempted" is checked, not assumed (test_network_guard_records proves the guard works).
"""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INV = ROOT / ".venv" / "bin" / "inv"
PY = ROOT / ".venv" / "bin" / "python"
CORPUS = ROOT / "tests" / "data" / "inventories"
TIMEOUT = 60

GUARD = '''\
import os, sys

_log = os.environ.get("RUNBOOK_TEST_NET_LOG")
_EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
           "socket.sendto", "socket.bind"}

def _hook(event, args):
    if _log and event in _EVENTS:
        with open(_log, "a") as f:
            f.write(f"{event} {args!r}\\n")

sys.addaudithook(_hook)

# Chain to the next sitecustomize on the path (e.g. the distribution's), as if this one were not here.
_here = os.path.dirname(os.path.abspath(__file__))
_saved = sys.path[:]
try:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    del sys.modules["sitecustomize"]
    import sitecustomize  # noqa: F401
except Exception:
    pass
finally:
    sys.path[:] = _saved
'''


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("netguard")
    (d / "sitecustomize.py").write_text(GUARD)
    return d


def _env(guard_dir: Path, tmp_path: Path, inventory: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_") and k != "RUNBOOK_STEP_ANSWERS"}
    env.update(PYTHONPATH=str(guard_dir), RUNBOOK_TEST_NET_LOG=str(tmp_path / "net.log"),
               INVOKE_RUNBOOK_STATE_DIR=str(tmp_path / "state"), NO_COLOR="1", COLUMNS="200")
    if inventory is not None:
        env["INVOKE_RUNBOOK_INVENTORY"] = str(inventory)
    return env


def run_inv(args: list[str], *, guard_dir: Path, tmp_path: Path, inventory: Path | None):
    return subprocess.run([str(INV), *args], cwd=ROOT, env=_env(guard_dir, tmp_path, inventory),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)


def net_log(tmp_path: Path) -> str:
    p = tmp_path / "net.log"
    return p.read_text() if p.exists() else ""


def test_network_guard_records(guard_dir, tmp_path):
    """The guard sees a lookup (a numeric one: nothing leaves the machine): an empty log means something."""
    code = "import socket; socket.getaddrinfo('192.0.2.1', 22, type=socket.SOCK_STREAM)"
    r = subprocess.run([str(PY), "-c", code], cwd=ROOT, env=_env(guard_dir, tmp_path, None),
                       capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert r.returncode == 0, r.stderr
    assert "socket.getaddrinfo" in net_log(tmp_path)


# -- a malformed inventory: refused before the state dir, the ledger or any socket -----------------

CASES = [
    ("unknown_host_key.yml", ["etcd.install"], "hosts.etcd02.adress"),
    ("bad_role.yml", ["cluster.up", "--dry"], "hosts.etcd01.roles.0: 'etc' is not a role"),
    ("empty.yml", ["runbook.status"], "the file is empty"),
    ("duplicate_key.yml", ["postgres.install", "--hosts", "node01"], "hosts.etcd02: duplicate key"),
    ("two_etcd.yml", ["etcd.status"], "2 etcd host(s)"),
    ("tabs.yml", ["cluster.status"], "tab character"),
    ("bad_address.yml", ["bundle.push", "--dry"], "hosts.etcd02.address"),
    ("duplicate_address.yml", ["runbook.history"], "hosts.etcd03.address"),
    ("invalid_syntax.yml", ["patroni.install", "--dry"], "invalid YAML at line 12"),
    ("nul_byte.yml", ["cluster.up", "--dry"], ":6: a NUL byte (0x00) at line 6, column 31"),
    ("os_rhel9.yml", ["postgres.install"], "cluster.os: 'rhel9' is not supported yet"),
]


@pytest.mark.parametrize("name,args,expect", CASES, ids=[f"{c[0]}-{c[1][0]}" for c in CASES])
def test_bad_inventory_fails_before_anything(guard_dir, tmp_path, name, args, expect):
    r = run_inv(args, guard_dir=guard_dir, tmp_path=tmp_path, inventory=CORPUS / name)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    assert name in r.stderr and expect in r.stderr, out
    state = tmp_path / "state"
    assert not state.exists(), sorted(state.rglob("*"))  # no state dir, let alone an empty ledger
    assert net_log(tmp_path) == ""


def test_missing_inventory_file(guard_dir, tmp_path):
    r = run_inv(["runbook.status"], guard_dir=guard_dir, tmp_path=tmp_path, inventory=tmp_path / "absent.yml")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "absent.yml" in r.stderr and "cannot read" in r.stderr
    assert not (tmp_path / "state").exists()
    assert net_log(tmp_path) == ""


# -- a valid inventory, an unknown --hosts name ------------------------------------------------------

def _ledger(tmp_path: Path) -> tuple[list[tuple], int, int] | None:
    dbs = list((tmp_path / "state").rglob("*.db")) if (tmp_path / "state").exists() else []
    if not dbs:
        return None
    assert len(dbs) == 1, dbs
    conn = sqlite3.connect(dbs[0])
    try:
        runs = conn.execute("SELECT command, outcome FROM runs").fetchall()
        checkpoints = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        conn.close()
    return runs, checkpoints, events


@pytest.mark.parametrize("args", [["etcd.install", "--hosts", "nosuch"],
                                  ["cluster.up", "--dry", "--hosts", "etcd01,nosuch"],
                                  ["etcd.install", "--hosts", "etcd01,,etcd02"]],
                         ids=["install", "dry", "empty-piece"])
def test_unknown_hosts_name_is_refused(guard_dir, tmp_path, args):
    r = run_inv(args, guard_dir=guard_dir, tmp_path=tmp_path, inventory=ROOT / "hosts.yml")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    assert "--hosts" in r.stderr and "hosts.yml" in r.stderr, out
    assert ("nosuch" in r.stderr) if "nosuch" in args[-1] else ("empty host name" in r.stderr), out
    assert net_log(tmp_path) == ""
    assert not (tmp_path / "state").exists()  # --hosts is checked before the state dir or the ledger


def test_unknown_hosts_name_records_no_run(guard_dir, tmp_path):
    run_inv(["etcd.install", "--hosts", "nosuch"], guard_dir=guard_dir, tmp_path=tmp_path,
            inventory=ROOT / "hosts.yml")
    assert _ledger(tmp_path) is None


# -- every task explains itself ----------------------------------------------------------------------

def _task_names(guard_dir: Path, tmp_path: Path) -> list[str]:
    r = run_inv(["--list"], guard_dir=guard_dir, tmp_path=tmp_path, inventory=None)
    assert r.returncode == 0, r.stderr
    return re.findall(r"^  (\S+)", r.stdout, flags=re.MULTILINE)


# `.venv/bin/inv` is three lines: `sys.exit(invoke.main.program.run())`. To keep ~30 `--help` runs fast,
# one warm interpreter imports invoke once and forks a child per task that runs exactly that, with
# argv ["inv", "--help", TASK] and its own stdout/stderr files; the child's exit status is the real one.
HELP_DRIVER = """\
import json, os, sys
from invoke.main import program

out_dir, names = sys.argv[1], sys.argv[2:]
# Warm up: load tasks.py (and so every runbook module) once, before forking.
saved = os.dup(1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
try:
    program.run(["inv", "--list"], exit=False)
finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
result = {}
for i, name in enumerate(names):
    so, se = os.path.join(out_dir, f"{i}.out"), os.path.join(out_dir, f"{i}.err")
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.dup2(os.open(so, os.O_WRONLY | os.O_CREAT, 0o600), 1)
            os.dup2(os.open(se, os.O_WRONLY | os.O_CREAT, 0o600), 2)
            sys.argv = ["inv", "--help", name]
            program.run(sys.argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    result[name] = [os.waitstatus_to_exitcode(status), open(so).read(), open(se).read()]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def helps(guard_dir, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """`inv --help TASK` for every task that `inv --list` shows."""
    import json

    tmp = tmp_path_factory.mktemp("help")
    names = _task_names(guard_dir, tmp)
    assert len(names) >= 10, names
    r = subprocess.run([str(PY), "-c", HELP_DRIVER, str(tmp), *names], cwd=ROOT,
                       env=_env(guard_dir, tmp, None),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(out) == sorted(names)
    return out


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    try:
        start = lines.index(f"{title}:") + 1
    except ValueError:
        return []
    body = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        body.append(line)
    return [line for line in body if line.strip()]


def help_problems(name: str, text: str) -> tuple[list[str], int]:
    """(problems, options seen) in one `inv --help TASK` output."""
    problems, seen = [], 0
    doc = " ".join(line.strip() for line in _section(text, "Docstring"))
    if not doc or doc == "none":
        problems.append(f"{name}: no docstring")
    for line in _section(text, "Options"):
        if line.strip() == "none" or not re.match(r"^\s{2}-", line):
            continue  # no options, or a wrapped continuation of the previous help text
        seen += 1
        m = re.match(r"^\s{2}(-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not m or not m.group(2):
            problems.append(f"{name}: option without help: {line.strip()}")
    return problems, seen


def test_help_checker_catches_gaps():
    text = ("Usage: inv[oke] [--core-opts] x.y [--options] [other tasks here ...]\n\nDocstring:\n  none\n\n"
            "Options:\n  -a STRING, --alpha=STRING   what alpha is\n                              wrapped\n"
            "  -b, --beta\n\n")
    problems, seen = help_problems("x.y", text)
    assert seen == 2
    assert problems == ["x.y: no docstring", "x.y: option without help: -b, --beta"]


def test_every_task_has_help(helps):
    problems, options = [], 0
    for name, (rc, so, se) in sorted(helps.items()):
        if rc != 0:
            problems.append(f"{name}: `inv --help {name}` exit {rc}: {se.strip()[-200:]}")
            continue
        p, n = help_problems(name, so)
        problems += p
        options += n
    assert not problems, "\n".join(problems)
    assert options >= 10  # the parser did look at options (etcd.install alone has 4)


def test_help_never_needs_a_valid_inventory(guard_dir, tmp_path, helps):
    """The real `.venv/bin/inv --help` (no fork), against an empty inventory: same text, nothing created."""
    r = run_inv(["--help", "etcd.install"], guard_dir=guard_dir, tmp_path=tmp_path,
                inventory=CORPUS / "empty.yml")
    assert r.returncode == 0 and "Docstring:" in r.stdout, r.stderr
    assert r.stdout == helps["etcd.install"][1]
    assert not (tmp_path / "state").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
