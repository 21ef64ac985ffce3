"""Shared probes: one command whose answer several checks of a host read, run once per --verify batch.

A check that needs, e.g., `etcdctl endpoint health` writes `shared(cmd)` in its place. On its own (a step's
turn, the Ansible playbook of the bench, by hand) that is the command itself. In a host's batch
(runbook.core.batch) where two or more checks use the same command, the batch runs it once before those checks,
keeps its stdout and exit status in a root-only temporary directory ($RUNBOOK_SHARED), and each check reads
them there: same output, same exit status, one process start instead of several. The checks of one batch are
taken at the same moment anyway (side by side); a shared answer is never older than the batch.

A shared command must be a read-only probe whose stdout and exit status are all its checks use (its stderr
is dropped, its stdin is /dev/null, as for a batched check).
"""
from __future__ import annotations

import hashlib
import re
import shlex

ENV = "RUNBOOK_SHARED"
_KNOWN: dict[str, str] = {}  # key -> command, of every shared() made in this process
_USE = re.compile(r'\$' + ENV + r'/([0-9a-f]{16})\.rc')


def key_of(cmd: str) -> str:
    return hashlib.sha256(cmd.encode()).hexdigest()[:16]


def shared(cmd: str) -> str:
    """`cmd` as a check writes it: its own run, or the batch's shared answer when there is one (the rc file is
    written last: present means complete)."""
    key = key_of(cmd)
    _KNOWN[key] = cmd
    f = f"${ENV}/{key}"
    return (f'if [ -n "${{{ENV}:-}}" ] && [ -r "{f}.rc" ]; then cat "{f}.out"; read -r rb_rc <"{f}.rc"; '
            f'[ "$rb_rc" = 0 ]; else {cmd}; fi')


def uses(check: str) -> set[str]:
    """The keys of the shared commands `check` reads: those made by shared() in this process and written whole
    in it (a check edited after it was made runs its command itself)."""
    return {k for k in _USE.findall(check) if k in _KNOWN and _KNOWN[k] in check}


def to_share(checks: list[str]) -> dict[str, str]:
    """{key: command} of the shared commands that two or more of `checks` use (one alone runs it itself)."""
    count: dict[str, int] = {}
    for c in checks:
        for k in uses(c):
            count[k] = count.get(k, 0) + 1
    return {k: _KNOWN[k] for k in sorted(count) if count[k] > 1}


def run_once(key: str, cmd: str, timeout: int) -> str:
    """The batch's line that runs one shared command, within `timeout` seconds as a check does, and keeps its
    answer (the checks that read it start once every shared command of the batch has ended)."""
    f = f"${ENV}/{key}"
    return (f'timeout {timeout} sh -c {shlex.quote(cmd)} </dev/null >"{f}.out" 2>/dev/null; '
            f'echo $? >"{f}.rc"')
