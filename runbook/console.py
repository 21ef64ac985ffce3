"""Rich output: per-host progress, plan and status tables, failure summaries, the --step prompt."""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.prompt import Prompt
from rich.table import Table

if TYPE_CHECKING:
    from runbook.core.engine import Decision, Report
    from runbook.core.step import Step

LOG_WIDTH = 160  # off a terminal (a pipe, a log, CI) Rich would use 80 columns and cut table cells


def make_console(**kw: object) -> Console:
    """A Rich console; off a terminal it is $COLUMNS wide (at least 80), else LOG_WIDTH, so tables in logs
    keep their cells ("endpoint", not "endpoi…")."""
    c = Console(highlight=False, **kw)  # type: ignore[arg-type]
    if c.is_terminal:
        return c
    cols = os.environ.get("COLUMNS", "")
    width = max(int(cols), 80) if cols.isdigit() else LOG_WIDTH
    return Console(highlight=False, width=width, **kw)  # type: ignore[arg-type]


console = make_console()

STYLE = {"done": "green", "manual": "cyan", "will run": "yellow", "changed": "magenta",
         "interrupted": "red", "drifted": "red", "failed": "red", "running": "red",
         "rolled_back": "blue", "skipped": "dim", "new machine": "red"}


@contextmanager
def step_progress(step: "Step", hosts: list[str]) -> Iterator[Callable[[str, str | None], None]]:
    """A spinner while the step runs, and one line per host as it finishes."""
    t0 = time.monotonic()
    left = set(hosts)
    mu = threading.Lock()
    console.print(f"[bold]▶ {step.name}[/] [dim]{step.title} · {step.kind} · {len(hosts)} host(s)[/]")
    with console.status(f"{step.name}: {', '.join(sorted(left))}") as status:
        def done(host: str, err: str | None) -> None:
            with mu:
                left.discard(host)
                mark = "[red]✗[/]" if err else "[green]✓[/]"
                console.print(f"  {mark} {host:<10} {time.monotonic() - t0:6.1f}s"
                              + (f"  [red]{err[:300]}[/]" if err else ""))
                status.update(f"{step.name}: waiting for {', '.join(sorted(left)) or '-'}")
        yield done


def plan_table(report: "Report", title: str = "Plan") -> Table:
    hosts: list[str] = []
    rows: dict[str, dict[str, "Decision"]] = {}
    for d in report.plan:
        if d.host.name not in hosts:
            hosts.append(d.host.name)
        rows.setdefault(d.step.name, {})[d.host.name] = d
    order = report.order
    t = Table(title=title, caption="wave: a step starts once the steps it needs are done on their hosts; steps of "
                                   "one wave may run at the same time" if order else None)
    t.add_column("step")
    if order:
        t.add_column("wave", justify="right")
        t.add_column("needs")
    for h in hosts:
        t.add_column(h)
    irreversible = {d.step.name for d in report.plan if d.step.irreversible}
    if order:  # in dependency order (the run's order breaks ties)
        rows = dict(sorted(rows.items(), key=lambda kv: order.get(kv[0], (0, []))[0]))
    for step, cells in rows.items():
        mark = " [bold red](irreversible)[/]" if step in irreversible else ""
        first = [step + mark]
        if order:
            wave, needs = order.get(step, (0, []))
            first += [str(wave), ", ".join(needs) or "[dim]-[/]"]
        t.add_row(*first, *[_cell(cells.get(h)) for h in hosts])
    return t


def _cell(d: "Decision | None") -> str:
    if d is None:
        return "[dim]·[/]"
    return f"[{STYLE.get(d.label, 'white')}]{d.label}[/]"


def plan_reasons(report: "Report") -> Table:
    t = Table(title="Why", show_lines=False)
    for c in ("host", "step", "decision", "reason"):
        t.add_column(c)
    for d in report.plan:
        why = d.reason + (f"; [bold red]irreversible[/]: {escape(d.step.irreversible)}" if d.step.irreversible
                          and d.run else "")
        t.add_row(d.host.name, d.step.name, _cell(d), why)
    return t


def status_table(steps: list["Step"], hosts: list[str], records: dict[tuple[str, str], str]) -> Table:
    t = Table(title="Ledger: steps x hosts")
    t.add_column("step")
    for h in hosts:
        t.add_column(h)
    for s in steps:
        cells = []
        for h in hosts:
            st = records.get((h, s.name))
            cells.append(f"[{STYLE.get(st, 'white')}]{st}[/]" if st else "[dim]·[/]")
        t.add_row(s.name, *cells)
    return t


class RichObserver:
    """The engine's observer on a terminal (or a log): per-host progress lines and the --step prompt."""

    def step_progress(self, step: "Step", hosts: list[str]):
        return step_progress(step, hosts)

    def notice(self, text: str) -> None:
        console.print(f"[yellow]![/] {escape(text)}")

    def ask_step(self, step: "Step", decisions: list["Decision"], mask: Callable[[str], str]) -> str:
        console.rule(f"{step.name}: {step.title}")
        for line in step_summary(step, decisions):
            console.print(escape(line))
        while True:
            answer = ask_step(step.name)
            if answer != "details":
                return answer
            show_step_detail(step, decisions, mask)


def step_summary(step: "Step", decs: list["Decision"]) -> list[str]:
    """What --step shows before its question: what the step does, where, and how much (the full commands
    are one key away)."""
    from runbook.core.step import Local, Put, Run, Upload

    n = len(decs)
    out = [f"{step.kind} step on {n} host(s): "
           + ", ".join(f"{d.host.name} ({d.label})" for d in decs)]
    groups: dict[tuple[int, int, int, int], list[str]] = {}
    for d in decs:
        counts = (sum(isinstance(a, Put) for a in d.actions), sum(isinstance(a, Upload) for a in d.actions),
                  sum(isinstance(a, Run) for a in d.actions), sum(isinstance(a, Local) for a in d.actions))
        groups.setdefault(counts, []).append(d.host.name)
    for (puts, ups, runs, local), hosts in groups.items():
        what = [f"{puts} file(s) written" if puts else "", f"{ups} file(s) uploaded" if ups else "",
                f"{runs} command(s)" if runs else "", f"{local} local action(s)" if local else ""]
        out.append(f"  {', '.join(w for w in what if w) or 'nothing'} on {', '.join(hosts)}")
    reasons = sorted({d.reason for d in decs})
    out.append(f"  why: {'; '.join(reasons)}")
    if step.irreversible:
        out.append(f"  IRREVERSIBLE: {step.irreversible}")
    return out


def show_step_detail(step: "Step", decs: list["Decision"], mask: Callable[[str], str]) -> None:
    from rich.syntax import Syntax  # pygments: only --step's detail highlights shell (every run imports this module)

    for d in decs:
        console.print(f"[bold]{escape(d.host.name)}[/] ({escape(d.label)}: {escape(d.reason)})")
        script = "\n".join(a.shell(mask) for a in d.actions)
        console.print(Syntax(script, "bash", word_wrap=True))


PROMPT = "[y]es / [s]kip / [c]ontinue all / [q]uit / [d]etails (the full commands)"
ANSWERS = {"y": "yes", "s": "skip", "c": "continue", "q": "quit", "d": "details"}


def ask_step(step_name: str) -> str:
    if not sys.stdin.isatty():
        raise SystemExit("--step needs an interactive terminal (stdin is not a TTY)")
    # escape(): Rich reads "[y]" as markup and would print "es / kip / ontinue all / uit"
    choice = Prompt.ask(escape(f"run {step_name}? {PROMPT}"), choices=list(ANSWERS), default="y",
                        show_choices=False)
    return ANSWERS[choice]


def summary_line(report: "Report", seconds: float) -> str:
    hosts = {h for h, _ in report.executed}
    steps = {s for _, s in report.executed}
    return (f"{len(report.executed)} (host, step) executed ({len(steps)} step(s) on {len(hosts)} host(s)), "
            f"{len(report.skipped)} skipped, {len(report.failed)} failed in {seconds:.1f}s")
