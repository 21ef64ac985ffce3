"""What a step's file actions say by themselves: their check, the copy kept before a file is replaced,
and their undo. A `Put` or `Upload` declares the desired state (content, mode, owner), so its check
and its undo come from it (pyinfra's `files.put` in spirit); a hand-written check or undo only adds
what the files cannot say (a service answers, a unit is enabled).
"""
from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Union

from runbook.core.step import Action, Put, Run, Upload

UNDO_DIR = "/var/lib/pg-ha-runbook/undo"  # the original of every file a step replaced, by its path
FileAction = Union[Put, Upload]


def file_actions(actions: list[Action]) -> list[FileAction]:
    """The files the actions put, one per path (the last action on a path wins)."""
    by_path: dict[str, FileAction] = {}
    for a in actions:
        if isinstance(a, (Put, Upload)):
            by_path.pop(a.path, None)
            by_path[a.path] = a
    return list(by_path.values())


def _mode(mode: str) -> str:
    return format(int(mode, 8), "o")  # as `stat -c %a` prints it: 0640 -> 640


def _stat_test(files: Sequence[FileAction], fmt: str, want: list[str]) -> str:
    paths = " ".join(shlex.quote(f.path) for f in files)
    return f"test \"$(stat -c '{fmt}' {paths} 2>/dev/null)\" = {shlex.quote(chr(10).join(want))}"


def files_check(actions: list[Action], full: bool = False) -> str | None:
    """One shell command (exit 0 = every file in place): mode, owner and group of every file, the
    sha256 of every Put, and the size of every Upload (its sha256 too when `full`, i.e. --verify:
    bundle files are large and were hashed on the host when they were sent)."""
    files = file_actions(actions)
    if not files:
        return None
    puts = [f for f in files if isinstance(f, Put)]
    ups = [f for f in files if isinstance(f, Upload)]
    parts = []
    if puts:
        parts.append(_stat_test(puts, "%a %U %G", [f"{_mode(p.mode)} {p.owner} {p.group or p.owner}" for p in puts]))
        plain = [p for p in puts if not p.accept]
        if plain:
            sums = " ".join(shlex.quote(f"{p.sha256}  {p.path}") for p in plain)
            parts.append(f"printf '%s\\n' {sums} | sha256sum --quiet --status -c - 2>/dev/null")
        for p in puts:
            if p.accept:
                alts = " || ".join(f"[ \"$s\" = {sha} ]" for sha in (p.sha256, *p.accept))
                parts.append(f"{{ s=$(sha256sum < {shlex.quote(p.path)} | cut -c1-64) && {{ {alts}; }}; }}")
    if ups:
        parts.append(_stat_test(ups, "%a %U %G %s", [f"{_mode(u.mode)} {u.owner} {u.group} {u.size}" for u in ups]))
        if full:
            marked: dict[str, list[Upload]] = {}
            for u in ups:
                if u.stat_mark:
                    marked.setdefault(u.stat_mark, []).append(u)
            parts += [stat_verified(group, mark) for mark, group in marked.items()]
            plain_ups = [u for u in ups if not u.stat_mark]
            if plain_ups:
                sums = " ".join(shlex.quote(f"{u.sha256}  {u.path}") for u in plain_ups)
                parts.append(f"printf '%s\\n' {sums} | sha256sum --quiet --status -c - 2>/dev/null")
    return " && ".join(parts)


# Size, mtime and ctime (to the nanosecond), inode, path: what any write to a file changes. A program can set a
# file's mtime back (touch -d), never its ctime: the kernel sets it to "now" on every write, chmod, chown,
# rename and touch. Only a change of the system clock could forge it, and root alone can do that.
STAT_FORMAT = "%s %.9Y %.9Z %i %n"


def stat_record(paths: Sequence[str], mark: str) -> str:
    """A command that takes the files' stat into `mark`.pending (root-only, 0600 in a 0700 directory). Take it
    BEFORE hashing the files, and move it to `mark` only once they hashed right: a file written after the
    record was taken has another ctime, so the record never vouches for content that was not hashed."""
    m = shlex.quote(mark)
    d = shlex.quote(mark.rsplit("/", 1)[0])
    files = " ".join(shlex.quote(p) for p in paths)
    return (f"install -d -m 0700 {d} && rm -f {m} && (umask 077 && "
            f"stat -c {shlex.quote(STAT_FORMAT)} {files} > {m}.pending)")


def stat_commit(mark: str) -> str:
    """After the files hashed right: the pending record becomes the record."""
    return f"mv {shlex.quote(mark)}.pending {shlex.quote(mark)}"


def _awk_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stat_verified(ups: Sequence[Upload], mark: str) -> str:
    """One shell command (exit 0 = every file holds its sha256): a file whose stat line is the one in `mark`
    (taken when the file was hashed: stat_record) is not read again; every other file (a stat that differs, no
    record, a missing file) is re-hashed against its sha256. Cost: one stat per file, plus the hashing of
    what changed."""
    table = "; ".join(f"want[{_awk_str(u.path)}] = {_awk_str(u.sha256 + '  ' + u.path)}" for u in ups)
    awk = (f"BEGIN {{ {table}; while ((getline line < {_awk_str(mark)}) > 0) seen[line] = 1 }} "
           # a line as stat prints it now, absent from the record: its file is hashed again
           "!($0 in seen) { p = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ [^ ]+ /, \"\", p); "
           "print ((p in want) ? want[p] : \"0  \" p) } "
           # a file stat could not read (missing): a line that can never match
           f"END {{ if (NR != {len(ups)}) print \"0  missing\" }}")
    files = " ".join(shlex.quote(u.path) for u in ups)
    return (f"{{ d=$(stat -c {shlex.quote(STAT_FORMAT)} {files} 2>/dev/null | awk {shlex.quote(awk)}) && "
            "{ [ -z \"$d\" ] || printf '%s\\n' \"$d\" | sha256sum --quiet --status --strict -c - 2>/dev/null; }; }")


def _sha(f: FileAction) -> str:
    return f.sha256


def files_backup(actions: list[Action]) -> str | None:
    """Before a step's files are written: keep the original of every file it will replace (once: the
    copy made before the runbook first changed it), or note that the file did not exist."""
    files = file_actions(actions)
    if not files:
        return None
    lines = [f"umask 077; mkdir -p {UNDO_DIR}"]
    for f in files:
        p, b = shlex.quote(f.path), shlex.quote(UNDO_DIR + f.path)
        lines.append(f"if [ ! -e {b} ] && [ ! -e {b}.absent ]; then mkdir -p \"$(dirname {b})\"; "
                     f"if [ ! -e {p} ]; then : > {b}.absent; "
                     f"elif [ \"$(sha256sum < {p} | cut -c1-64)\" != {_sha(f)} ]; then cp -a {p} {b}; fi; fi")
    return "\n".join(lines)


def files_undo(actions: list[Action]) -> list[Action]:
    """Restore every file the actions put from its kept original, or remove it when it was new; then
    the files' follow-up commands (e.g. systemctl daemon-reload after a unit file went)."""
    files = file_actions(actions)
    if not files:
        return []
    lines = []
    for f in files:
        p, b = shlex.quote(f.path), shlex.quote(UNDO_DIR + f.path)
        lines.append(f"if [ -e {b} ]; then mkdir -p \"$(dirname {p})\" && mv -f {b} {p}; else rm -f {p}; fi; "
                     f"rm -f {b}.absent")
    out: list[Action] = [Run("\n".join(lines))]
    follow = [f.on_restore for f in files if isinstance(f, Put) and f.on_restore]
    out += [Run(c) for c in dict.fromkeys(follow)]
    return out
