"""Steps as data: typed actions, a check, an undo. One definition serves apply, plan, step mode,
export, verify and rollback (see DESIGN.md, "The step model").

The files a step puts (Put, Upload) bring their own check and undo (runbook.core.files); a step's
hand-written check and undo only add what its files cannot say. Its hosts (Step.hosts) and its
fingerprint (actions + depends_on) are defined here once, for every mode.
"""
from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Union

if TYPE_CHECKING:
    from runbook.core.context import RunContext as Ctx
    from runbook.inventory import Host


@dataclass(frozen=True)
class Run:
    """A shell command on the host, as `user` (root by default, through sudo -n)."""

    cmd: str
    user: str = "root"
    stdin: bytes | None = None  # content travels on stdin, never in argv; not stored, not exported
    timeout: float = 900

    def describe(self) -> str:
        who = "" if self.user == "root" else f"[as {self.user}] "
        return f"{who}{self.cmd}" + (" <<stdin>>" if self.stdin else "")

    def shell(self, mask: Callable[[str], str]) -> str:
        cmd = self.cmd if self.user == "root" else f"sudo -u {self.user} sh -c {shlex.quote(self.cmd)}"
        if self.stdin is not None:
            body = mask(self.stdin.decode(errors="replace"))
            return f"{cmd} <<'RUNBOOK_EOF'\n{body.rstrip()}\nRUNBOOK_EOF"
        return cmd

    def digest(self) -> bytes:
        return b"run\0" + self.user.encode() + b"\0" + self.cmd.encode() + b"\0" + (self.stdin or b"")


@dataclass(frozen=True)
class Put:
    """A file with content, mode and owner; uploaded only when its sha256, mode or owner differ."""

    path: str
    content: bytes
    mode: str = "0644"
    owner: str = "root"
    group: str | None = None
    secret: bool = False  # masked in exports, diffs and the ledger
    source: str | None = None  # the template it was rendered from
    local_copy: str | None = None  # export shows "copy this local file" instead of the content
    # Other sha256s that also count as this file being in place (a later step edits it on purpose, e.g.
    # etcd's initial-cluster-state); not part of the digest.
    accept: tuple[str, ...] = ()
    on_restore: str | None = None  # a command to run after the undo restored or removed the file

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def describe(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return f"put {self.path} mode {self.mode} owner {self.owner}:{self.group or self.owner}{src} " \
               f"sha256 {self.sha256[:12]}"

    def shell(self, mask: Callable[[str], str]) -> str:
        if self.local_copy:
            return (f"# copy {self.local_copy} from the control machine, then:\n"
                    f"install -D -m {self.mode} -o {self.owner} -g {self.group or self.owner} "
                    f"./{Path(self.local_copy).name} {self.path}")
        text = self.content.decode(errors="replace")
        text = mask(text) if self.secret else text
        return (f"install -D -m {self.mode} -o {self.owner} -g {self.group or self.owner} /dev/stdin {self.path}"
                f" <<'RUNBOOK_EOF'\n{text.rstrip()}\nRUNBOOK_EOF")

    def digest(self) -> bytes:
        return f"put\0{self.path}\0{self.mode}\0{self.owner}\0{self.group}\0".encode() + self.content


@dataclass(frozen=True)
class Upload:
    """A (large) file from the control machine, e.g. from the bundle; skipped when the sha256 matches."""

    src: Path
    path: str
    sha256: str
    size: int
    mode: str = "0644"
    owner: str = "root"
    # A root-only record of the files' stat (runbook.core.files.stat_record), written by the step when it had
    # hashed them on the host: --verify then re-hashes only the files whose stat no longer matches it.
    stat_mark: str | None = None

    @property
    def group(self) -> str:
        return self.owner  # the transport installs an upload as owner:owner

    def describe(self) -> str:
        return f"upload {self.src.name} -> {self.path} ({self.size} bytes, sha256 {self.sha256[:12]})"

    def shell(self, mask: Callable[[str], str]) -> str:
        return (f"# copy {self.src} to this host as {self.path}, then check:\n"
                f"echo '{self.sha256}  {self.path}' | sha256sum -c -")

    def digest(self) -> bytes:
        return f"upload\0{self.path}\0{self.sha256}\0{self.mode}\0{self.owner}".encode()


@dataclass(frozen=True)
class Local:
    """Python work on the control machine (PKI, bundle checks); its label describes it."""

    label: str
    fn: Callable[[], str | None] = field(compare=False)
    key: str = ""  # what the work depends on, for the fingerprint

    def describe(self) -> str:
        return f"local: {self.label}"

    def shell(self, mask: Callable[[str], str]) -> str:
        return f"# on the control machine: {self.label}"

    def digest(self) -> bytes:
        return f"local\0{self.label}\0{self.key}".encode()


Action = Union[Run, Put, Upload, Local]
Check = Union[str, bool, None]  # a shell command (rc 0 = effect present), a known answer, or no check
Kind = Literal["parallel", "barrier", "serial"]


Dependency = Union[Run, Put, Upload, Local, str]


def fingerprint(actions: list[Action], depends: list[Dependency] | None = None) -> str:
    """sha256 of the rendered actions, then of what the step declares it depends on (depends_on=)."""
    h = hashlib.sha256()
    for a in actions:
        h.update(a.digest())
        h.update(b"\x1e")
    for d in depends or []:
        h.update(b"dep\0" + (d.encode() if isinstance(d, str) else d.digest()))
        h.update(b"\x1e")
    return h.hexdigest()


def wait_for(cmd: str, seconds: int, interval: int = 1) -> str:
    """A bounded poll as a shell command: rc 0 as soon as cmd succeeds, 1 after `seconds`."""
    tries = max(1, seconds // interval)
    return (f"for i in $(seq {tries}); do ( {cmd} ) >/dev/null 2>&1 && exit 0; sleep {interval}; done; "
            f"( {cmd} )")


# A section's functions take its own context (runbook.cluster.context.Ctx, a RunContext): typed Any here,
# since a function of the subclass is not a function of the base class for a type checker.
ActionsFn = Callable[[Any, "Host"], list[Action]]
CheckFn = Callable[[Any, "Host"], Check]
DependsFn = Callable[[Any, "Host"], list[Dependency]]


@dataclass
class Step:
    name: str  # "etcd.config"
    section: str
    index: int  # global position in the runbook
    role: str  # etcd | postgres | local | all
    doc: str
    actions_fn: ActionsFn
    kind: Kind = "parallel"
    check_fn: CheckFn | None = None
    undo_fn: ActionsFn | None = None
    undo_reason: str = ""  # why there is no undo
    guards_data: Callable[[Any, "Host"], str] | None = None  # undo would delete this data dir
    host_order: Callable[[Any, list["Host"]], list["Host"]] | None = None  # serial steps
    only: Callable[[Any, list["Host"]], list["Host"]] | None = None  # narrow the role's hosts
    always_check: bool = False  # a cheap check that runs even on done steps; a failure re-runs it
    depends_on: DependsFn | None = None  # what else the step's effect depends on (feeds the fingerprint)
    explain: Callable[[Any, "Host"], list[str]] | None = None  # --dry: diffs its files cannot show (read-only)
    # Why the step cannot be undone (a member removed, a data dir wiped): shown in the plan and the export;
    # rollback refuses it, whatever undo the step has.
    irreversible: str = ""
    # The steps this one needs done (on every host they run on) before it starts, by name; None: the step
    # before it in its section (runbook.core.schedule). A plain run starts a step as soon as they are done.
    needs: tuple[str, ...] | None = None

    def check(self, fn: CheckFn) -> CheckFn:
        self.check_fn = fn
        return fn

    def undo(self, fn: ActionsFn) -> ActionsFn:
        self.undo_fn = fn
        return fn

    def hosts(self, ctx: "Ctx", selected: Sequence["Host"]) -> list["Host"]:
        """The hosts this step runs on among `selected`, in the order it runs them: its role, narrowed by
        `only`, ordered by `host_order`. The engine, --dry, --step, export, rollback, mark-done and
        forget all ask this one method."""
        if self.role == "local":
            return ctx.inventory.role("local")
        names = {h.name for h in selected}
        hosts = ctx.inventory.role(self.role)
        hosts = self.only(ctx, hosts) if self.only else hosts
        hosts = [h for h in hosts if h.name in names]
        return self.host_order(ctx, hosts) if self.host_order else hosts

    def fingerprint(self, ctx: "Ctx", host: "Host", actions: list[Action]) -> str:
        return fingerprint(actions, self.depends_on(ctx, host) if self.depends_on else None)

    def probe(self, ctx: "Ctx", host: "Host", actions: list[Action] | None = None) -> Check:
        """The whole check: the files the actions put (sha256, mode, owner: derived, one command) and
        the hand-written check, which only adds what the actions cannot say."""
        from runbook.core.files import files_check

        files = files_check(self.actions_fn(ctx, host) if actions is None else actions,
                            full=ctx.options.verify)
        hand = self.check_fn(ctx, host) if self.check_fn else None
        if hand is False or files is None:
            return hand
        if hand is None or hand is True:
            return files
        return f"{files} && {{ {hand}\n}}"

    def undo_actions(self, ctx: "Ctx", host: "Host") -> list[Action]:
        """The hand-written undo (e.g. stop the service) then the derived one: every file the actions
        put is restored from the copy kept before it was replaced, or removed when it was new."""
        from runbook.core.files import files_undo

        hand = self.undo_fn(ctx, host) if self.undo_fn else []
        return hand + files_undo(self.actions_fn(ctx, host))

    def undo_missing(self, ctx: "Ctx", host: "Host") -> str | None:
        """Why the step cannot be rolled back on host (None when it can: a hand-written or a derived undo)."""
        from runbook.core.files import file_actions

        if self.irreversible:
            return f"irreversible: {self.irreversible}"
        if self.undo_fn is not None or file_actions(self.actions_fn(ctx, host)):
            return None
        return self.undo_reason or "no undo defined"

    @property
    def title(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name


class Section:
    """One section of the walk-through: an ordered list of steps, declared with @section.step()."""

    def __init__(self, name: str, order: int, doc: str):
        self.name, self.order, self.doc = name, order, doc
        self.steps: list[Step] = []

    def step(self, name: str, role: str, kind: Kind = "parallel", **kw) -> Callable[[ActionsFn], Step]:
        def deco(fn: ActionsFn) -> Step:
            s = Step(name=f"{self.name}.{name}", section=self.name, index=self.order * 100 + len(self.steps),
                     role=role, doc=fn.__doc__ or name, actions_fn=fn, kind=kind, **kw)
            self.steps.append(s)
            return s
        return deco
