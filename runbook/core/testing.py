"""A fake transport for unit tests of the engine (fabric.testing in spirit): no hosts, no sockets.

Each host has an in-memory file system; commands are answered by rules (regex -> rc, stdout)
and every call is recorded, so tests assert on what would have been sent.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from runbook.core.transport import Result, Transport, TransportError
from runbook.inventory import Host


class FakeTransport(Transport):
    def __init__(self) -> None:
        self.files: dict[tuple[str, str], tuple[bytes, str, str]] = {}
        self.rules: list[tuple[re.Pattern, Any]] = []  # result: rc, (rc, stdout) or callable(host, cmd)
        self.calls: list[tuple[str, str, str]] = []  # (host, user, cmd)
        self.writes: list[tuple[str, str]] = []  # (host, path) of every write and upload
        self.down: set[str] = set()
        self.batches: list[tuple[str, int]] = []  # (host, number of checks) of every --verify batch script
        self._mu = threading.Lock()

    def on(self, pattern: str, result) -> None:
        """Answer commands matching pattern with result: int rc, (rc, stdout) or callable(host, cmd)."""
        self.rules.insert(0, (re.compile(pattern), result))

    def run(self, host: Host, cmd: str, *, user: str = "root", stdin: bytes | None = None,
            timeout: float = 900, lock: bool = False) -> Result:
        if host.name in self.down:
            raise TransportError(f"{host.name} ({host.address}): unreachable (fake)")
        parts = getattr(cmd, "parts", None)
        if parts is not None:  # a batch of checks (runbook.core.batch): each part answered by the rules
            return self._batch(host, cmd, parts)
        with self._mu:
            self.calls.append((host.name, user, cmd))
        for pat, res in self.rules:
            if pat.search(cmd):
                answer = res(host, cmd) if callable(res) else res
                rc, out = (answer, "") if isinstance(answer, int) else answer
                return Result(rc, out, "" if rc == 0 else f"fake failure of {cmd[:40]}")
        return Result(0, "", "")

    def _batch(self, host: Host, script: Any, parts: list[tuple[int, str]]) -> Result:
        from runbook.core.identity import IDENTITY_CMD

        with self._mu:
            self.batches.append((host.name, len(parts)))
        out = []
        if script.identity:
            out.append(f"RUNBOOK-ID 0 {self.run(host, IDENTITY_CMD).stdout.strip()}")
        for i, cmd in parts:
            out.append(f"RUNBOOK-CHECK {i} {self.run(host, str(cmd)).rc}")
        return Result(0, "\n".join(out) + "\n", "")

    def put(self, host: Host, path: str, content: bytes, *, mode: str = "0644", owner: str = "root",
            group: str | None = None) -> bool:
        if host.name in self.down:
            raise TransportError(f"{host.name}: unreachable (fake)")
        key = (host.name, path)
        new = (content, mode, owner)
        with self._mu:
            if self.files.get(key) == new:
                return False
            self.files[key] = new
            self.writes.append(key)
        return True

    def read(self, host: Host, path: str) -> str | None:
        f = self.files.get((host.name, path))
        return f[0].decode() if f else None

    def remote_sha256(self, host: Host, path: str) -> str | None:
        import hashlib

        f = self.files.get((host.name, path))
        return hashlib.sha256(f[0]).hexdigest() if f else None

    def upload(self, host: Host, src: Path, path: str, *, mode: str = "0644", owner: str = "root") -> None:
        with self._mu:
            self.files[(host.name, path)] = (src.read_bytes(), mode, owner)
            self.writes.append((host.name, path))

    def commands(self, host: str | None = None) -> list[str]:
        return [c for h, _, c in self.calls if host is None or h == host]
