"""Loading hosts.yml: parse (duplicate keys refused), validate the schema, then the topology, then resolve.

Every problem is one `InventoryError` whose message names the file, the line, the YAML path and what to do.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from runbook.errors import InventoryError
from runbook.inventory.messages import _describe, _line_of, _loc, _message, _semantic_errors
from runbook.inventory.model import EXAMPLE, Host, Inventory, InventoryFile
from runbook.inventory.yamlio import _parse


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate hosts.yml; raise InventoryError naming file, line, YAML path and what to do."""
    path = Path(path).resolve()
    data, root = _parse(path)

    def line(loc: tuple, msg: str) -> str:
        n = _line_of(root, loc)
        return f"{path}{f':{n}' if n else ''}: {_loc(loc)}: {msg}"

    if data is None:
        raise InventoryError(f"{path}: the file is empty (or only comments); an inventory needs cluster: "
                             f"(name), hosts: (name -> address, roles) and optionally ssh:; {EXAMPLE}")
    if not isinstance(data, dict):
        raise InventoryError(line((), f"expected a mapping with keys cluster, ssh and hosts, got "
                                      f"{_describe(data)}; {EXAMPLE}"))
    try:
        spec = InventoryFile.model_validate(data)
    except ValidationError as exc:
        # Unknown keys first: a typo ('adress') usually explains the missing key that follows.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise InventoryError("\n".join(line(tuple(e["loc"]), _message(dict(e))) for e in errors)) from None
    problems = _semantic_errors(spec)
    if problems:
        raise InventoryError("\n".join(line(loc, msg) for loc, msg in problems))
    base = path.parent

    def _path(p: str | None) -> Path | None:
        return None if p is None else (base / Path(p).expanduser())

    # No balancer host named: HAProxy and keepalived run on the PostgreSQL hosts (only with a vip).
    implicit = spec.cluster.vip is not None and not any("balancer" in h.roles for h in spec.hosts.values())

    def _roles(h) -> tuple[str, ...]:
        return tuple(h.roles) + (("balancer",) if implicit and "postgres" in h.roles else ())

    hosts = tuple(
        Host(name=n, address=h.address, roles=_roles(h), fqdn=h.fqdn, user=h.user or spec.ssh.user,
             port=h.port or spec.ssh.port, key=_path(spec.ssh.key), known_hosts=_path(spec.ssh.known_hosts),
             sudo=spec.ssh.sudo, connect_timeout=spec.ssh.connect_timeout,
             os=h.os or spec.cluster.os)
        for n, h in spec.hosts.items() if not h.retired
    )
    retired = tuple(n for n, h in spec.hosts.items() if h.retired)
    return Inventory(path=path, cluster=spec.cluster, hosts=hosts, retired=retired)

