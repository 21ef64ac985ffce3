"""What a person reads: the whole runbook as Markdown (per section, step and host), and the diffs of
rendered files against a host for `--dry`."""
from __future__ import annotations

import difflib

from runbook.core.context import RunContext
from runbook.core.engine import Decision
from runbook.core.files import files_backup
from runbook.core.step import Put, Step


def file_diffs(ctx: RunContext, dec: Decision) -> list[str]:
    """Unified diffs of the step's rendered files against the host (secrets masked), then what the step's
    own `explain` adds (e.g. patroni.dynamic: the DCS against the inventory)."""
    out = [ctx.redact(text) for text in dec.step.explain(ctx, dec.host)] if dec.step.explain else []
    for a in dec.actions:
        if not isinstance(a, Put):
            continue
        tr = ctx.transport_for(dec.host)
        try:
            current = tr.read(dec.host, a.path) or ""
        except Exception as exc:  # an unreachable host: the plan still shows, the diff says why
            out.append(f"--- {dec.host.name}:{a.path}: cannot read ({exc})")
            continue
        new = a.content.decode(errors="replace")
        if current == new:
            continue
        if a.local_copy:  # a private key: say that it differs, never show it
            out.append(f"--- {dec.host.name}:{a.path}: differs from {a.local_copy} (content not shown)")
            continue
        if a.secret:
            current, new = ctx.redact(current), ctx.redact(new)
        out.append("".join(difflib.unified_diff(current.splitlines(True), new.splitlines(True),
                                                f"{dec.host.name}:{a.path} (on host)", f"{a.path} (rendered)")))
    return out


def export_markdown(ctx: RunContext, steps: list[Step]) -> str:
    """The whole runbook for a person: per section, step and host, exact commands and files."""
    inv = ctx.inventory
    lines = [f"# Runbook for cluster `{inv.cluster.name}`", "",
             f"Inventory: `{inv.path}`. Run every block as root on the host named in its heading, in order.",
             "Secrets are masked as `***`: take them from state/secrets.yml on the control machine.",
             "After doing a step by hand, record it: `inv runbook.mark-done STEP --hosts HOST --note '...'`.", ""]
    section = None
    for s in steps:
        if s.section != section:
            section = s.section
            lines += [f"## Section `{section}`", ""]
        lines += [f"### {s.name}: {s.title}", ""]
        body = "\n".join(line.strip() for line in s.doc.strip().splitlines()[1:]).strip()
        if body:
            lines += [body, ""]
        if s.irreversible:
            lines += [f"**Irreversible**: {s.irreversible}. It cannot be rolled back; a resumed run does not "
                      "repeat it once done.", ""]
        hosts = s.hosts(ctx, ctx.inventory.hosts)
        lines.append(f"Hosts: {', '.join(h.name for h in hosts)} ({s.kind})." + "\n")
        for h in hosts:
            lines += [f"#### {s.name} on {h.name}", "", "```sh"]
            actions = s.actions_fn(ctx, h)
            keep = files_backup(actions) if s.role != "local" else None
            if keep:  # what the runbook does before it writes files, so that a rollback can restore them
                lines += ["# keep the originals of the files below (rollback restores them)", keep]
            lines += [a.shell(ctx.redact) for a in actions]
            lines += ["```", ""]
            probe = s.probe(ctx, h, actions)
            if isinstance(probe, str):
                lines += ["Check (exit 0 = done):", "", "```sh", ctx.redact(probe), "```", ""]
    return "\n".join(lines)
