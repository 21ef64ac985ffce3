"""Patroni section: venv from the wheelhouse, config, validation, unit, ordered start."""
from __future__ import annotations

import shlex

from runbook.cluster.commands import member_ok, member_ok_rest, psql, verdict_ok
from runbook.cluster.context import Ctx
from runbook.cluster.dynamic import dynamic_check, dynamic_command, dynamic_explain, dynamic_undo, patroni_probe
from runbook.cluster.render import patroni_context
from runbook.core.step import Put, Run, Section, wait_for
from runbook.inventory import Host
from runbook.sections.bundle_files import REMOTE_BUNDLE, manifest, remote
from runbook.sections.units import template, unit_actions, unit_undo

section = Section("patroni", 40, "Patroni: venv, offline wheels, config, unit and an ordered start")


def pctx(ctx: Ctx, host: Host) -> dict:
    return patroni_context(ctx.inventory, host, ctx.secrets, ctx.paths)


def bootstrap_host(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    first = ctx.inventory.postgres[0]
    return [h for h in hosts if h.name == first.name]


def replica_hosts(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    first = ctx.inventory.postgres[0]
    return [h for h in hosts if h.name != first.name]


@section.step("venv", role="postgres")
def venv(ctx: Ctx, host: Host) -> list:
    """Python venv: python3 with the venv module (installed from the bundle), venv /opt/patroni"""
    p = ctx.paths_for(host)
    v = p.patroni_venv
    return [Run(f"{p.python3} -c 'import venv, ensurepip' || {{ echo '{p.venv_package} is missing: it comes with "
                "the postgres.packages step from the bundle' >&2; exit 1; }"),
            Run(f"test -x {v}/bin/python || {p.python3} -m venv {v}")]


@venv.check
def _venv_check(ctx: Ctx, host: Host) -> str:
    return f"{ctx.paths.patroni_venv}/bin/python -c 'import sys; assert sys.prefix != sys.base_prefix'"


@venv.undo
def _venv_undo(ctx: Ctx, host: Host) -> list:
    v = ctx.paths.patroni_venv
    return [Run(f"rm -rf {v}/bin {v}/lib {v}/lib64 {v}/include {v}/pyvenv.cfg {v}/share")]


@section.step("wheels", role="postgres")
def wheels(ctx: Ctx, host: Host) -> list:
    """Patroni from the wheelhouse: pip install --no-index --require-hashes (no network, no compiler)
    Then what `patroni --version` loads (the entry point's module and its imports) and the drivers are imported
    once; when they import, the venv's files are recorded (root-only, /var/lib/pg-ha-runbook/patroni-venv.stat:
    the sha256 of every file's size, mtime, ctime, inode and path, taken before the import). The check compares
    that record with the venv as it is: a package removed or added, a file written, replaced, removed or
    touched (any write sets its ctime to now, which no program can set back) re-runs the step."""
    req = manifest(ctx).requirements(host.os)
    wheel_dir = remote(req).rsplit("/", 1)[0]
    v = ctx.paths.patroni_venv
    mark = WHEELS_MARK
    return [Run(f"echo '{req.sha256}  {remote(req)}' | sha256sum --quiet -c -"),
            Run(f"PIP_CONFIG_FILE=/dev/null {v}/bin/pip install --quiet --no-index --disable-pip-version-check "
                f"--find-links {wheel_dir} --require-hashes -r {remote(req)}", timeout=900),
            # -B: the import writes no bytecode, so the record taken before it still matches after it
            Run(f"install -d -m 0700 {mark.rsplit('/', 1)[0]} && rm -f {mark} && (umask 077 && "
                f"{venv_state(ctx)} > {mark}.pending) && test -x {v}/bin/patroni && "
                f"{v}/bin/python -B -c 'import patroni.__main__, psycopg2, etcd' && mv {mark}.pending {mark}")]


# Root-only (the directory is 0700 root): the venv as it was when its imports last passed.
WHEELS_MARK = "/var/lib/pg-ha-runbook/patroni-venv.stat"


def venv_state(ctx: Ctx) -> str:
    """A command printing the sha256 of the venv's files: size, mtime, ctime (ns), inode and path of every file
    and link under bin/ and lib/, and pyvenv.cfg. Not the __pycache__ directories (bytecode an import as root
    may add: Python checks it against its source) nor the directories themselves (their times move with
    that); a file added, removed or written changes the sum. ~2000 files: one find, no interpreter."""
    v = ctx.paths.patroni_venv
    return (f"find {v}/bin {v}/lib {v}/pyvenv.cfg -name __pycache__ -prune -o ! -type d "
            f"-printf '%s %T@ %C@ %i %p\\n' 2>&1 | LC_ALL=C sort | sha256sum | cut -d' ' -f1")


@wheels.check
def _wheels_check(ctx: Ctx, host: Host) -> str:
    """The venv's files are the ones recorded when the imports last passed (no interpreter started)."""
    return f"test \"$({venv_state(ctx)})\" = \"$(cat {WHEELS_MARK} 2>/dev/null)\""


@wheels.undo
def _wheels_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"{ctx.paths.patroni_venv}/bin/pip uninstall -y -q patroni psycopg2-binary || true"),
            Run(f"rm -f {WHEELS_MARK} {WHEELS_MARK}.pending")]


@section.step("profile", role="postgres")
def profile(ctx: Ctx, host: Host) -> list:
    """Profile: PATRONI_CONFIG_FILE, PG_CONFIG and PATH in /etc/profile.d/patroni.sh"""
    return [template("patroni/profile.sh.j2", ctx.paths.patroni_profile, pctx(ctx, host))]


def _config(ctx: Ctx, host: Host, c: dict | None = None) -> Put:
    return template("patroni/config.yml.j2", ctx.paths.patroni_conf, c or pctx(ctx, host), mode="0600",
                    owner="postgres", secret=True)


@section.step("config", role="postgres")
def config(ctx: Ctx, host: Host) -> list:
    """Config: /etc/patroni/config.yml (0600, postgres) with every parameter of the walk-through
    Fixed for Patroni 4 and for safety: one pg_hba, hostssl + scram-sha-256 only, ssl on, REST API
    over TLS with basic auth; passwords from state/secrets.yml. A running Patroni is reloaded."""
    c = pctx(ctx, host)
    conf_dir = ctx.paths.patroni_conf.rsplit("/", 1)[0]
    return [Run(f"install -d -m 0750 -o postgres -g postgres {conf_dir}"),
            _config(ctx, host, c),
            # the bootstrap step brings the post_bootstrap script for its one start; a copy an older
            # runbook left on every host (with the admin password in it) goes
            Run(f"rm -f {ctx.paths.post_bootstrap}"),
            Run("systemctl reload patroni 2>/dev/null || true")]


@section.step("logdir", role="postgres")
def logdir(ctx: Ctx, host: Host) -> list:
    """Log directory: /data/log/patroni owned by postgres"""
    return [Run(f"install -d -m 0700 -o postgres -g postgres {ctx.paths.patroni_log_dir}")]


@logdir.check
def _logdir_check(ctx: Ctx, host: Host) -> str:
    return f"test \"$(stat -c %U {ctx.paths.patroni_log_dir})\" = postgres"


@logdir.undo
def _logdir_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"rmdir {ctx.paths.patroni_log_dir} 2>/dev/null || true")]


# validate-config checks that the etcd hosts answer: never while etcd.existing restarts them one at a time
@section.step("validate", role="postgres", depends_on=lambda ctx, host: [_config(ctx, host)],  # re-validate on change
              needs=("patroni.logdir", "etcd.existing"))
def validate(ctx: Ctx, host: Host) -> list:
    """Validate: patroni --validate-config --ignore-listen-port on the rendered config
    A successful validation leaves a root-only mark: the sha256 of what the validator judged (the config file,
    the venv's interpreter and installed packages, the PostgreSQL binaries), taken before it ran. The check
    compares the mark with the same sha256 of today's files and re-tests what may change without them (the
    etcd hosts answer, the data directory's PostgreSQL version), instead of starting the validator again."""
    v = ctx.paths.patroni_venv
    mark = VALIDATED
    return [Run(f"rm -f {mark} && install -d -m 0700 {mark.rsplit('/', 1)[0]} && "
                f"{validated_inputs(ctx, host)} > {mark}.pending && chmod 0600 {mark}.pending"),
            Run(f"{v}/bin/patroni --validate-config --ignore-listen-port {ctx.paths.patroni_conf}", user="postgres"),
            Run(f"mv {mark}.pending {mark}")]


# Root-only (the directory is 0700 root): the mark stands for a validation only root could have run.
VALIDATED = "/var/lib/pg-ha-runbook/patroni-validated.sha256"


def validated_inputs(ctx: Ctx, host: Host) -> str:
    """A command printing the sha256 of what `patroni --validate-config` judges that only a change of files can
    change: the config, the venv (pyvenv.cfg: the interpreter; every installed distribution's RECORD: the
    file hashes of patroni and its dependencies), the PostgreSQL binaries (listing and `postgres --version`).
    A missing or unreadable input changes the sum too."""
    p = ctx.paths_for(host)
    v, b = p.patroni_venv, p.pg_bin_dir(ctx.inventory.cluster.postgres_major)
    return (f"{{ cat {ctx.paths.patroni_conf} {v}/pyvenv.cfg {v}/lib/python3*/site-packages/*.dist-info/RECORD; "
            f"ls -ln --time-style=+%s {b}/; {b}/postgres --version; }} 2>&1 | sha256sum | cut -d' ' -f1")


def validated_live(ctx: Ctx, host: Host) -> str:
    """What the validator tests besides files, as it tests it: every etcd host of the config answers on its
    port (a TCP connect), and a data directory in use holds the binaries' major (PG_VERSION) and pg_wal."""
    p = ctx.paths_for(host)
    major = ctx.inventory.cluster.postgres_major
    d = p.pgdata(major)
    tcp = [": </dev/tcp/" + "/".join(hp.rsplit(":", 1)) for hp in pctx(ctx, host)["etcd_hosts"]]
    etcd = " && ".join(f"timeout 5 bash -c {shlex.quote(t)}" for t in tcp)
    # empty as Patroni counts it: no global/pg_control, nothing but hidden entries and lost+found
    empty = f"test ! -f {d}/global/pg_control && test -z \"$(ls {d} 2>/dev/null | grep -vx lost+found)\""
    return f"{etcd} && {{ {empty} || {{ test \"$(cat {d}/PG_VERSION)\" = {major} && test -d {d}/pg_wal; }}; }}"


@section.step("unit", role="postgres")
def unit(ctx: Ctx, host: Host) -> list:
    """Unit: /etc/systemd/system/patroni.service (User=postgres, KillMode=process), daemon-reload, enable"""
    return unit_actions("patroni", template("systemd/patroni.service.j2", ctx.paths.patroni_unit, pctx(ctx, host)))


@unit.check
def _unit_check(ctx: Ctx, host: Host) -> str:
    return "systemctl is-enabled -q patroni"


@unit.undo
def _unit_undo(ctx: Ctx, host: Host) -> list:
    return unit_undo("patroni")


@section.step("bootstrap", role="postgres", only=bootstrap_host, needs=("patroni.unit", "etcd.existing"))
def bootstrap(ctx: Ctx, host: Host) -> list:
    """Start the first node: Patroni initialises the cluster; bounded wait until it is the leader
    (or, re-applied after a rollback while the other node took over, until it streams from it)
    The post_bootstrap script (creates the admin role, no password in it: patroni.roles sets it) is
    there for this start only and removed once the node runs; the check wants it gone too."""
    pb = ctx.paths.post_bootstrap
    script = template("patroni/post_bootstrap.sh.j2", pb, pctx(ctx, host)).content
    return [Run(f"install -m 0700 -o postgres -g postgres /dev/stdin {pb}", stdin=script),
            Run("systemctl start patroni"),
            Run(wait_for(member_ok(ctx, host), 180, 2), user="postgres", timeout=240),
            Run(f"rm -f {pb}")]


@bootstrap.check
def _bootstrap_check(ctx: Ctx, host: Host) -> str:
    return (f"systemctl is-active -q patroni && {patroni_probe(ctx, host)} | {verdict_ok('member')} "
            f"&& test ! -e {ctx.paths.post_bootstrap}")


@bootstrap.undo
def _bootstrap_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl stop patroni")]


# A session that sets passwords: no statement in the server log, not even with an error (an ALTER ROLE
# that fails would otherwise be logged with its PASSWORD literal at log_min_error_statement = error).
NO_LOG_SQL = ("SET log_statement TO 'none';", "SET log_min_error_statement TO 'panic';",
              "SET log_min_duration_statement TO -1;")


def current_leader(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    """The Patroni leader once the cluster is initialised (asked through patronictl), else the bootstrap
    host. When no leader answers, the bootstrap host too: the roles step then refuses there, clearly."""
    from runbook.cluster.readers import leader

    first = ctx.inventory.postgres[0]
    rec = ctx.ledger.get(first.name, "patroni.bootstrap") if ctx.ledger is not None else None
    if rec is None or rec.status not in ("done", "manual"):
        return bootstrap_host(ctx, hosts)
    try:
        lead = leader(ctx)
    except RuntimeError:  # no postgres host answered patronictl list
        lead = None
    name = lead.name if lead else first.name
    return [h for h in hosts if h.name == name]


def roles_sql(ctx: Ctx) -> bytes:
    """Create or re-key the roles the bootstrap creates; repairs a bootstrap interrupted before them."""
    s = ctx.secrets
    out = [*NO_LOG_SQL, "SET synchronous_commit TO 'local';"]
    for key, attrs in (("replication", "REPLICATION LOGIN"), ("rewind", "LOGIN"), ("admin", "LOGIN CREATEDB")):
        u, p = s[key]["username"], s[key]["password"]
        out.append(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{u}') THEN "
                   f"CREATE ROLE {u} WITH {attrs}; END IF; END $$;")
        out.append(f"ALTER ROLE {u} WITH {attrs} PASSWORD '{p}';")
    ru = s["rewind"]["username"]
    for fn in ("pg_ls_dir(text, boolean, boolean)", "pg_stat_file(text, boolean)",
               "pg_read_binary_file(text)", "pg_read_binary_file(text, bigint, bigint, boolean)"):
        out.append(f"GRANT EXECUTE ON FUNCTION pg_catalog.{fn} TO {ru};")
    return ("\n".join(out) + "\n").encode()


@section.step("roles", role="postgres", only=current_leader)
def roles(ctx: Ctx, host: Host) -> list:
    """Roles: replication, rewind and admin roles exist with their passwords (on the current leader)
    Patroni creates them during bootstrap; a bootstrap interrupted before that left a cluster
    without them and replicas failing forever: this step detects and repairs it. It runs on the
    leader Patroni names (the first host before the cluster exists) and fails on a replica."""
    in_recovery = psql(ctx, "-tAc 'select pg_is_in_recovery()'")
    apply_sql = psql(ctx, "-v ON_ERROR_STOP=1 -f -")
    refuse = (f"echo '{host.name} is not a running primary: roles change on the leader only; run again when "
              "`inv cluster.status` shows a leader' >&2; exit 1")
    return [Run(f'if [ "$({in_recovery})" = f ]; then {apply_sql}; else {refuse}; fi', user="postgres",
                stdin=roles_sql(ctx))]


@roles.check
def _roles_check(ctx: Ctx, host: Host) -> str:
    u = ctx.secrets["replication"]["username"]
    q = shlex.quote(f"select 1 from pg_roles where rolname = '{u}' and rolreplication")
    return f"sudo -u postgres {psql(ctx, f'-tAc {q}')} | grep -q 1"


@section.step("replicas", role="postgres", kind="serial", only=replica_hosts)
def replicas(ctx: Ctx, host: Host) -> list:
    """Start the other nodes one by one; each is waited for until it streams from the leader"""
    return [Run("systemctl start patroni"),
            Run(wait_for(member_ok(ctx, host), 240, 2), user="postgres", timeout=300)]


@replicas.check
def _replicas_check(ctx: Ctx, host: Host) -> str:
    return f"systemctl is-active -q patroni && sudo -u postgres {member_ok_rest(ctx, host)}"


@replicas.undo
def _replicas_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl stop patroni")]


__all__ = ["section", "REMOTE_BUNDLE"]


@validate.check
def _validate_check(ctx: Ctx, host: Host) -> str:
    """The mark of the last successful validation matches today's files, and the live part still holds."""
    return f"test \"$({validated_inputs(ctx, host)})\" = \"$(cat {VALIDATED})\" && {validated_live(ctx, host)}"


@validate.undo
def _validate_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"rm -f {VALIDATED} {VALIDATED}.pending")]  # a probe: only its mark goes


@roles.undo
def _roles_undo(ctx: Ctx, host: Host) -> list:
    return []  # the roles stay: dropping them would break replication and rewind


@section.step("dynamic", role="postgres", only=bootstrap_host, check_fn=dynamic_check, undo_fn=dynamic_undo,
              explain=dynamic_explain)
def dynamic(ctx: Ctx, host: Host) -> list:
    """Dynamic config: the DCS holds the inventory's cluster.patroni settings (ttl, synchronous mode, parameters)
    bootstrap.dcs is read only when the cluster is created: on a running cluster the difference between
    `patronictl show-config` and the inventory (cluster.patroni over the walk-through's values, permanent
    slots, max_slot_wal_keep_size) is applied with `patronictl edit-config`; `--dry` shows it as a diff.
    A slot or a PostgreSQL parameter the inventory does not name is removed. Patroni reloads every member;
    a parameter that needs a restart leaves the members "pending restart": `inv patroni.restart --pending`
    restarts them in order.
    A change made by hand in the DCS since is found by --verify."""
    return [Run(dynamic_command(ctx, "apply"), user="postgres", timeout=180)]
