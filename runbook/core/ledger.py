"""The ledger: state/<cluster>.db, one row per (host, step), every run and every action.

WAL + synchronous=FULL so that a recorded checkpoint survives kill -9 and power loss; every write
is its own transaction. Text that may carry secrets passes through `redact` before it is stored.

Reads and writes use plain sqlite3: a no-op run reads the ledger and records its run, and importing
sqlite-utils (~0.1-0.5 s) would cost more than the whole no-op. sqlite-utils creates the tables of a new
ledger (one definition of the schema, its column types) and serves `Ledger.db` (views, tests).
"""
from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from runbook.errors import RunbookError

if TYPE_CHECKING:
    import sqlite_utils

TABLES = ("runs", "checkpoints", "events", "identities")
STATUSES = ("pending", "running", "done", "failed", "rolled_back", "manual")
TAIL = 2000


class LedgerLocked(RunbookError):
    """Another live runbook process holds the run lock."""


def now() -> float:
    return round(time.time(), 3)


@dataclass
class Checkpoint:
    host: str
    step: str
    status: str
    fingerprint: str | None
    run_id: int | None
    mode: str | None
    started: float | None
    finished: float | None
    duration: float | None
    note: str | None
    error: str | None
    machine: str | None = None  # the host's identity (/etc/machine-id) when the record was written


class Ledger:
    def __init__(self, path: Path | str, redact: Callable[[str], str] = lambda s: s):
        self.path = Path(path)
        memory = str(path) == ":memory:"  # a read-only view of a state dir that has no ledger yet
        if not memory:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.redact = redact
        self._mu = threading.Lock()
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        if not memory:
            os.chmod(self.path, 0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self.conn = conn
        self._db: sqlite_utils.Database | None = None
        self._schema()
        self._lock_fd: int | None = None
        self.run_id: int | None = None
        self.identities: dict[str, str] = {}  # host -> machine-id read in this run; stamped on its records

    @property
    def db(self) -> sqlite_utils.Database:
        """The same connection through sqlite-utils (imported on first use: views and tests, not a run)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    def _schema(self) -> None:
        with self._mu:
            have = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
            if set(TABLES) <= have and "idx_events_run_id" in have:
                return  # an existing ledger: nothing to create, and no sqlite-utils import
            self.db.table("runs").create({
                "id": int, "command": str, "argv": str, "operator": str, "machine": str, "pid": int,
                "started": float, "finished": float, "outcome": str, "summary": str,
            }, pk="id", if_not_exists=True)
            self.db.table("checkpoints").create({
                "host": str, "step": str, "status": str, "fingerprint": str, "run_id": int, "mode": str,
                "started": float, "finished": float, "duration": float, "note": str, "error": str,
            }, pk=("host", "step"), if_not_exists=True)
            self.db.table("events").create({
                "id": int, "run_id": int, "at": float, "host": str, "step": str, "kind": str,
                "action": str, "rc": int, "duration": float, "stdout": str, "stderr": str,
            }, pk="id", if_not_exists=True)
            # Added later, as its own table: an older ledger gains it (its records have no identity yet) and
            # an older runbook reading a newer ledger never sees it.
            self.db.table("identities").create({"host": str, "step": str, "machine": str},
                                         pk=("host", "step"), if_not_exists=True)
            if not self.db.table("events").indexes:
                self.db.table("events").create_index(["run_id"], if_not_exists=True)

    # -- plain SQL (callers hold self._mu) ---------------------------------------------------------
    def _insert(self, table: str, row: dict) -> int:
        cols = ", ".join(f'"{c}"' for c in row)
        with self.conn:
            cur = self.conn.execute(f'INSERT INTO "{table}" ({cols}) VALUES ({", ".join("?" * len(row))})',
                                    list(row.values()))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _upsert(self, table: str, row: dict) -> None:
        """Insert the row, or update the given columns of the row with its (host, step) key."""
        cols = ", ".join(f'"{c}"' for c in row)
        sets = ", ".join(f'"{c}" = excluded."{c}"' for c in row if c not in ("host", "step"))
        self.conn.execute(f'INSERT INTO "{table}" ({cols}) VALUES ({", ".join("?" * len(row))}) '
                          f"ON CONFLICT (host, step) DO UPDATE SET {sets}", list(row.values()))

    def _rows(self, sql: str, args: list) -> list[dict]:
        cur = self.conn.execute(sql, args)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # -- run lock ---------------------------------------------------------------------------
    def acquire(self, command: str, argv: list[str]) -> int:
        """Take the run lock (flock: released by the kernel when the holder dies) and open a run."""
        lock_path = self.path.with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LedgerLocked(f"{self.path}: another runbook run holds the lock ({holder}); wait for it "
                               "to finish, or check that process - a second concurrent run is refused") from None
        stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}: {command}".encode(), 0)
        self._lock_fd = fd
        self.stale_lock = stale or None
        if stale:
            # The previous holder died (kill -9, power loss): its running run is closed as interrupted.
            with self._mu:
                with self.conn:
                    self.conn.execute("UPDATE runs SET outcome='interrupted', finished=? WHERE outcome='running'",
                                      [now()])
        with self._mu:
            self.run_id = self._insert("runs", {
                "command": command, "argv": self.redact(json.dumps(argv)), "operator": getpass.getuser(),
                "machine": socket.gethostname(), "pid": os.getpid(), "started": now(), "outcome": "running",
            })
        assert self.run_id is not None  # sqlite assigns the rowid
        return self.run_id

    def release(self, outcome: str, summary: str = "") -> None:
        if self.run_id is not None:
            with self._mu:
                with self.conn:
                    self.conn.execute("UPDATE runs SET finished = ?, outcome = ?, summary = ? WHERE id = ?",
                                      [now(), outcome, self.redact(summary), self.run_id])
            self.run_id = None
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- checkpoints -------------------------------------------------------------------------
    _SELECT = "SELECT c.*, i.machine FROM checkpoints c LEFT JOIN identities i USING (host, step)"

    def _query(self, where: str = "", args: list | None = None) -> list[Checkpoint]:
        with self._mu:
            cur = self.conn.execute(self._SELECT + where, args or [])
            cols = [d[0] for d in cur.description]
            return [Checkpoint(**dict(zip(cols, r, strict=True))) for r in cur.fetchall()]

    def get(self, host: str, step: str) -> Checkpoint | None:
        rows = self._query(" WHERE c.host = ? AND c.step = ?", [host, step])
        return rows[0] if rows else None

    def all(self) -> list[Checkpoint]:
        return self._query()

    def set(self, host: str, step: str, status: str, *, fingerprint: str | None = None, mode: str = "auto",
            note: str | None = None, error: str | None = None, started: float | None = None) -> None:
        assert status in STATUSES, status
        t = now()
        row: dict[str, object] = {"host": host, "step": step, "status": status, "run_id": self.run_id, "mode": mode,
               "note": self.redact(note) if note else None, "error": self.redact(error)[-TAIL:] if error else None}
        if fingerprint is not None:
            row["fingerprint"] = fingerprint
        if status == "running":
            row.update(started=t, finished=None, duration=None)
        else:
            row.update(finished=t)
            if started is not None:
                row.update(started=started, duration=round(t - started, 3))
        with self._mu:
            with self.conn:
                self._upsert("checkpoints", row)
                if self.identities.get(host):
                    self._upsert("identities", {"host": host, "step": step, "machine": self.identities[host]})

    def adopt_identity(self, host: str, machine: str) -> int:
        """Stamp `machine` on the host's records that have none (written before identities were kept)."""
        with self._mu:
            with self.conn:
                cur = self.conn.execute("INSERT OR IGNORE INTO identities (host, step, machine) "
                                        "SELECT host, step, ? FROM checkpoints WHERE host = ?", [machine, host])
            return cur.rowcount

    def forget(self, host: str, step: str) -> bool:
        with self._mu:
            with self.conn:
                self.conn.execute("DELETE FROM identities WHERE host = ? AND step = ?", [host, step])
                cur = self.conn.execute("DELETE FROM checkpoints WHERE host = ? AND step = ?", [host, step])
            return cur.rowcount > 0

    # -- events ------------------------------------------------------------------------------
    def event(self, host: str, step: str, kind: str, action: str = "", rc: int | None = None,
              stdout: str = "", stderr: str = "", duration: float | None = None) -> None:
        with self._mu:
            self._insert("events", {
                "run_id": self.run_id, "at": now(), "host": host, "step": step, "kind": kind,
                "action": self.redact(action), "rc": rc, "duration": duration,
                # redact first: a secret cut in half by the truncation would no longer match and leak its tail
                "stdout": self.redact(stdout)[-TAIL:], "stderr": self.redact(stderr)[-TAIL:],
            })

    def runs(self, limit: int = 20) -> list[dict]:
        with self._mu:
            return self._rows("SELECT * FROM runs ORDER BY id DESC LIMIT ?", [limit])

    def events(self, run_id: int | None = None, limit: int = 200) -> Iterator[dict]:
        where, args = (" WHERE run_id = ?", [run_id]) if run_id else ("", [])
        with self._mu:
            return iter(self._rows(f"SELECT * FROM events{where} ORDER BY id DESC LIMIT ?", [*args, limit]))

    def integrity(self) -> str:
        with self._mu:
            return self.conn.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        self.release("aborted") if self.run_id is not None else None
        self.conn.close()
