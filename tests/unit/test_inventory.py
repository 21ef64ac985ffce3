"""The inventory loader against a corpus of malformed hosts.yml files (tests/data/inventories/).

Every corpus file must raise `InventoryError` whose message names the file, the YAML path (or the
host) and what to do. EXPECT is the sidecar table: file -> substrings the message must contain (the
file name is always checked too). Adding a file to the corpus without a row here fails the suite.
"""
from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path

import pytest
import yaml

from runbook.inventory import LOCAL, Host, Inventory, InventoryError, load_inventory
from runbook.inventory.yamlio import UniqueKeyLoader, load_yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "inventories"
VALID = CORPUS / "valid.yml"

# file -> substrings of the message: the YAML path (or host / line) and a hint of what to do.
EXPECT: dict[str, tuple[str, ...]] = {
    "duplicate_key.yml": (":13: hosts.etcd02:", "duplicate key 'etcd02'", "first at line 11", "delete one"),
    "duplicate_key_nested.yml": ("cluster.name:", "duplicate key 'name'", "first at line 3", "rename"),
    "unknown_key_top.yml": ("host: unknown key 'host'", "did you mean 'hosts'?",
                            "allowed here: cluster, ssh, hosts"),
    "unknown_host_key.yml": ("hosts.etcd02.adress: unknown key", "did you mean 'address'?",
                             "hosts.etcd02.address: required key 'address' is missing"),
    "unknown_ssh_key.yml": ("ssh.password: unknown key", "allowed here: user, port, key, known_hosts"),
    "bad_address.yml": ("hosts.etcd02.address:", "'192.0.2.300' is not an IPv4 address",
                        "four numbers 0-255 separated by dots"),
    "ipv6_address.yml": ("hosts.node01.address:", "is an IPv6 address", "put the host's IPv4 address here"),
    "hostname_address.yml": ("hosts.node02.address:", "is a host name, not an IP address", "fqdn"),
    "unspecified_address.yml": ("hosts.etcd01.address:", "0.0.0.0 is the unspecified address",
                                "put the host's own IPv4 address"),
    "numeric_address.yml": ("hosts.node01.address:", "expected an IPv4 address, got a number",
                            "separated by dots"),
    "duplicate_address.yml": ("hosts.etcd03.address:", "192.0.2.12 is also the address of etcd02",
                              "give every host its own address"),
    "two_etcd.yml": ("hosts:", "2 etcd host(s) (etcd01, etcd02)", "odd number >= 3", "give 3 (or 5)"),
    "four_etcd.yml": ("hosts:", "4 etcd host(s)", "etcd04", "use 3 or 5"),
    "no_etcd.yml": ("hosts:", "0 etcd host(s) (none)", "roles: [etcd]"),
    "one_postgres.yml": ("hosts:", "1 postgres host(s) (node01)", "Patroni needs >= 2",
                         "add a host with roles: [postgres]"),
    "no_hosts.yml": ("hosts: no hosts", "odd number >= 3 of etcd hosts and >= 2 postgres hosts"),
    "missing_hosts.yml": ("hosts: required key 'hosts' is missing", "add a hosts: mapping"),
    "hosts_list.yml": ("hosts: expected a mapping of host name", "got a list",
                       "one 'name: {address: ..., roles: [...]}' line per host"),
    "host_without_settings.yml": ("hosts.node02:", "has no settings", "give it {address: <IPv4>, roles:"),
    "bad_role.yml": ("hosts.etcd01.roles.0: 'etc' is not a role; use etcd, postgres, balancer, backup or restore",),
    "empty_roles.yml": ("hosts.node02.roles:", "no roles", "give at least one of etcd, postgres"),
    "roles_not_list.yml": ("hosts.etcd01.roles:", "expected a list of roles", "roles: [etcd]"),
    "repeated_role.yml": ("hosts.etcd01.roles:", "etcd listed twice", "list each role once"),
    "bad_port.yml": ("hosts.node01.port:", "70000 is out of range", "use a TCP port 1-65535"),
    "ssh_port_zero.yml": ("ssh.port:", "0 is out of range", "use a TCP port 1-65535"),
    "port_not_number.yml": ("hosts.node01.port:", "expected a whole number, got text 'ssh'", "1-65535"),
    "bad_host_name_upper.yml": ("hosts.Etcd01:", "'Etcd01' is not a valid host name",
                                "lowercase letters, digits and '-'", "e.g. etcd01"),
    "bad_host_name_underscore.yml": ("hosts.node_01:", "'node_01' is not a valid host name", "e.g. node-01"),
    "reserved_host_name.yml": ("hosts.local:", "'local' is reserved", "rename the host"),
    "missing_cluster.yml": ("cluster: required key 'cluster' is missing", "add a cluster: section"),
    "cluster_name_spaces.yml": ("cluster.name:", "'my cluster' is not a valid cluster name", "(no spaces"),
    "cluster_not_mapping.yml": ("cluster: expected a mapping with keys name, namespace", "got text 'corpus'"),
    "namespace_no_slash.yml": ("cluster.namespace:", "'patroni'", "must start with '/'", "e.g. /patroni"),
    "postgres_major_range.yml": ("cluster.postgres_major:", "11 is out of range", "12-18"),
    "etcd_version_bad.yml": ("cluster.etcd_version:", "'3.5'", "write X.Y.Z, e.g. 3.5.16"),
    "bad_os.yml": ("cluster.os:", "'ubuntu22' is not a supported OS", "'debian12', 'debian13', 'rhel8' or 'rhel9'"),
    "os_rhel9.yml": ("cluster.os:", "'rhel9' is not supported yet", "use os: debian12 or os: debian13"),
    "major_not_shipped.yml": (":5: cluster.postgres_major:", "PostgreSQL 17 is not shipped by Debian 12",
                              "choices: 15 on debian12", "or os: debian13 for 17"),
    "mixed_os_major.yml": (":10: hosts.node02.os:", "debian13 ships PostgreSQL 17, not cluster.postgres_major 15",
                           "must all run the same major", "keep this host on debian12"),
    "host_bad_os.yml": ("hosts.etcd02.os:", "'debian11' is not a supported OS", "'debian12', 'debian13'"),
    "nul_byte.yml": (":6: a NUL byte (0x00) at line 6, column 31", "plain text", "remove it"),
    "sudo_not_bool.yml": ("ssh.sudo:", "expected true or false", "'sometimes'"),
    "bad_fqdn.yml": ("hosts.etcd01.fqdn:", "is not a DNS name", "e.g. etcd01.example.org"),
    "not_a_mapping.yml": ("(top level): expected a mapping with keys cluster, ssh and hosts", "got a list",
                          "hosts.yml for a complete example"),
    "scalar_document.yml": ("(top level): expected a mapping", "got text 'hosts.yml'"),
    "invalid_syntax.yml": (":12: invalid YAML at line 12, column 3", "while parsing a flow mapping",
                           "fix the syntax there"),
    "tabs.yml": (":11: invalid YAML at line 11", "tab character", "use spaces, not tabs"),
    "two_documents.yml": (":15: invalid YAML at line 15", "a second document ('---')",
                          "remove the extra '---'"),
    "empty.yml": ("the file is empty", "needs cluster:", "hosts:", "complete example"),
    "comments_only.yml": ("the file is empty (or only comments)", "needs cluster:"),
    "vip_outside_subnet.yml": ("cluster.vip:", "192.168.60.7 is not in 192.0.2.0/24", "balancer host node01",
                               "pick a free address in 192.0.2.0/24"),
    "vip_is_host_address.yml": ("cluster.vip:", "192.0.2.21 is the address of host node01", "a free address"),
    "vip_not_address.yml": ("cluster.vip:", "'front.example.org' is not an IPv4 address", "e.g. 192.0.2.100"),
    "ports_clash.yml": ("cluster.ports:", "three different ports", "5000, 5001, 6432"),
    "balancer_without_vip.yml": ("hosts.lb01.roles:", "needs a floating address", "add cluster.vip"),
    "not_utf8.yml": (":2: not UTF-8 text", "byte 0xe9", "save the file as UTF-8"),
}


def _message(path: Path) -> str:
    with pytest.raises(InventoryError) as exc:
        load_inventory(path)
    return str(exc.value)


def test_corpus_and_table_match():
    files = {p.name for p in CORPUS.glob("*.yml")} - {VALID.name}
    assert files == set(EXPECT), (f"corpus files without an EXPECT row: {sorted(files - set(EXPECT))}; "
                                  f"EXPECT rows without a file: {sorted(set(EXPECT) - files)}")
    assert len(files) >= 20


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_malformed_inventory(name):
    path = CORPUS / name
    msg = _message(path)
    assert name in msg
    for part in EXPECT[name]:
        assert part in msg, f"{name}: {part!r} not in:\n{msg}"
    # Compiler style: every line of the message starts with the file (optionally :line).
    for line in msg.splitlines():
        assert line.startswith(f"{path}:"), line
    # No raw pydantic wording leaks through.
    for raw in ("Input should", "Value error", "validation error", "String should", "[type="):
        assert raw not in msg, f"{name}: raw pydantic text {raw!r} in:\n{msg}"


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.yml")), ids=lambda p: p.name)
def test_corpus_addresses_are_never_routed(path):
    """The corpus only names TEST-NET-1 (192.0.2.0/24) or the lab's 192.168.60.0/24."""
    allowed = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("192.168.60.0/24")]
    text = path.read_bytes().decode("utf-8", errors="replace")
    for m in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", text):
        try:
            ip = ipaddress.IPv4Address(m)
        except ValueError:
            continue  # deliberately invalid (e.g. 192.0.2.300)
        assert ip.is_unspecified or any(ip in n for n in allowed), f"{path.name}: {m}"
    for m in re.findall(r"[0-9a-fA-F:]*::[0-9a-fA-F:]*", text):
        if len(m) > 2:
            assert ipaddress.IPv6Address(m) in ipaddress.ip_network("2001:db8::/32"), f"{path.name}: {m}"


def test_valid_corpus_file_loads():
    inv = load_inventory(VALID)
    assert inv.names() == ["etcd01", "etcd02", "etcd03", "node01", "node02"]
    assert [h.name for h in inv.etcd] == ["etcd01", "etcd02", "etcd03"]
    assert [h.name for h in inv.postgres] == ["node01", "node02"]
    assert inv.cluster.name == "corpus"
    h = inv.get("etcd01")
    assert isinstance(h, Host) and h.address == "192.0.2.11" and h.user == "runbook" and h.port == 22
    assert inv.role("local") == [LOCAL] and inv.role("all") == list(inv.hosts)


def test_repo_hosts_yml_loads():
    inv = load_inventory(ROOT / "hosts.yml")
    assert isinstance(inv, Inventory) and len(inv.etcd) % 2 == 1 and len(inv.postgres) >= 2


def test_overrides_defaults_and_relative_paths(tmp_path):
    text = VALID.read_text().replace("node02: {address: 192.0.2.22, roles: [postgres]}",
                                     "node02: {address: 192.0.2.22, roles: [postgres], user: admin, "
                                     "port: 2222}")
    text = text.replace("  port: 22", "  port: 22\n  key: keys/id_ed25519\n  known_hosts: keys/known_hosts")
    p = tmp_path / "sub" / "hosts.yml"
    p.parent.mkdir()
    p.write_text(text)
    inv = load_inventory(p)
    n1, n2 = inv.get("node01"), inv.get("node02")
    assert (n1.user, n1.port, n2.user, n2.port) == ("runbook", 22, "admin", 2222)
    assert n1.key == tmp_path / "sub" / "keys" / "id_ed25519"
    assert n1.known_hosts == tmp_path / "sub" / "keys" / "known_hosts"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    p = tmp_path / "hosts.yml"
    p.write_text("cluster: {name: corpus}\nhosts:\n"
                 "  etcd01: &etcd {address: 192.0.2.11, roles: [etcd]}\n"
                 "  etcd02: {<<: *etcd, address: 192.0.2.12}\n"
                 "  etcd03: {<<: *etcd, address: 192.0.2.13}\n"
                 "  node01: {address: 192.0.2.21, roles: [postgres]}\n"
                 "  node02: {address: 192.0.2.22, roles: [postgres]}\n")
    assert [h.address for h in load_inventory(p).etcd] == ["192.0.2.11", "192.0.2.12", "192.0.2.13"]


def test_several_problems_are_reported_at_once(tmp_path):
    p = tmp_path / "hosts.yml"
    text = VALID.read_text().replace("roles: [etcd]}", "roles: [etc]}", 2).replace("port: 22", "port: 0")
    p.write_text(text)
    msg = _message(p)
    assert "ssh.port: 0 is out of range" in msg
    assert "hosts.etcd01.roles.0: 'etc' is not a role" in msg
    assert "hosts.etcd02.roles.0: 'etc' is not a role" in msg
    assert len(msg.splitlines()) == 3


def test_missing_file_names_the_path_and_the_setting(tmp_path):
    msg = _message(tmp_path / "nope.yml")
    assert "nope.yml" in msg and "cannot read" in msg and "INVOKE_RUNBOOK_INVENTORY" in msg


def test_directory_instead_of_file(tmp_path):
    msg = _message(tmp_path)
    assert str(tmp_path) in msg and "cannot read" in msg


def test_load_yaml_names_duplicate_and_empty(tmp_path):
    p = tmp_path / "x.yml"
    p.write_text("a: 1\nb: {c: 1, c: 2}\n")
    with pytest.raises(InventoryError, match=r"x\.yml:2: b\.c: duplicate key 'c' \(first at line 2\)"):
        load_yaml(p)
    p.write_text("")
    assert load_yaml(p) is None
    p.write_text("a: [1, 2]\n")
    assert load_yaml(p) == {"a": [1, 2]}


def test_unique_key_loader_still_refuses_duplicates():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        yaml.load("a: 1\na: 2\n", Loader=UniqueKeyLoader)
    assert yaml.load("a: {b: 1}\n", Loader=UniqueKeyLoader) == {"a": {"b": 1}}


def test_alias_bomb_is_reported_quickly(tmp_path):
    """Aliases share nodes: a message must not expand them (a full repr would be 9**9 items)."""
    lines = ["cluster: {name: corpus}", "x0: &x0 [a, a, a, a, a, a, a, a, a]"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines += ["hosts:", "  etcd01: {address: 192.0.2.11, roles: *x8}"]
    p = tmp_path / "hosts.yml"
    p.write_text("\n".join(lines) + "\n")
    msg = _message(p)
    assert "x8: unknown key 'x8'" in msg and "hosts.etcd01.roles.0:" in msg and len(msg) < 10_000


def test_corpus_file_copied_elsewhere_is_named_by_its_new_path(tmp_path):
    dst = tmp_path / "site-b.yml"
    shutil.copy(CORPUS / "bad_role.yml", dst)
    assert str(dst) in _message(dst)


# -- --hosts selection --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inv() -> Inventory:
    return load_inventory(VALID)


@pytest.mark.parametrize("spec", [None, ""])
def test_select_none_or_empty_means_all(inv, spec):
    assert inv.select(spec) == list(inv.hosts)


def test_select_valid_names_in_inventory_order(inv):
    assert [h.name for h in inv.select("node02,etcd01")] == ["etcd01", "node02"]
    assert [h.name for h in inv.select(" etcd02 , node01 ")] == ["etcd02", "node01"]
    assert [h.name for h in inv.select("etcd03,etcd03")] == ["etcd03"]


def test_select_unknown_name(inv):
    with pytest.raises(InventoryError) as exc:
        inv.select("etcd01,nosuch")
    msg = str(exc.value)
    assert "--hosts" in msg and "nosuch" in msg and str(VALID) in msg
    assert "known: etcd01, etcd02, etcd03, node01, node02" in msg
    assert "etcd01," not in msg.split("known:")[0]  # only the unknown one is reported as unknown


def test_select_unknown_name_suggests_close_match(inv):
    with pytest.raises(InventoryError, match=r"'etcd1': did you mean 'etcd01'\?"):
        inv.select("etcd1")
    with pytest.raises(InventoryError, match=r"did you mean 'node01'\?"):
        inv.select("NODE01")


def test_select_names_separated_by_spaces(inv):
    with pytest.raises(InventoryError, match=r"'etcd01 node01': separate host names with commas, not spaces"):
        inv.select("etcd01 node01")


def test_select_role_instead_of_host(inv):
    with pytest.raises(InventoryError,
                       match=r"'postgres' is a role, not a host name \(its hosts: node01, node02\)"):
        inv.select("postgres")


@pytest.mark.parametrize("spec", ["etcd01,,etcd02", ",", "etcd01,", ",etcd01", " ", "etcd01, ,node01"])
def test_select_empty_pieces_are_refused(inv, spec):
    """A stray comma (or an unset shell variable in --hosts "$A,$B") must not silently shrink the targets."""
    with pytest.raises(InventoryError) as exc:
        inv.select(spec)
    msg = str(exc.value)
    assert f"--hosts {spec!r}" in msg and "empty host name" in msg and "e.g. --hosts etcd01,etcd02" in msg


def test_get_unknown_name(inv):
    with pytest.raises(InventoryError,
                       match=r"no host named 'node3'; did you mean 'node0[12]'\?.*known: etcd01"):
        inv.get("node3")


def test_a_retired_host_stays_in_the_file_and_nowhere_else(tmp_path):
    """etcd.replace / patroni.replace OLD: OLD may stay in hosts.yml marked retired; its address may be the new
    host's; it counts for no role, and naming it says why it is not there."""
    text = VALID.read_text().replace(
        "node02: {address: 192.0.2.22, roles: [postgres]}",
        "node02: {address: 192.0.2.22, roles: [postgres], retired: true}\n"
        "  node03: {address: 192.0.2.22, roles: [postgres]}")
    p = tmp_path / "hosts.yml"
    p.write_text(text)
    inv = load_inventory(p)
    assert inv.retired == ("node02",) and "node02" not in inv.names()
    assert [h.name for h in inv.postgres] == ["node01", "node03"]
    with pytest.raises(InventoryError, match="node02 is marked retired"):
        inv.get("node02")
    with pytest.raises(InventoryError, match="'node02' is marked retired"):
        inv.select("node02")
    # retiring one of two postgres hosts without a replacement leaves too few
    p.write_text(text.replace("  node03: {address: 192.0.2.22, roles: [postgres]}\n", ""))
    with pytest.raises(InventoryError, match=r"1 postgres host\(s\) \(node01\)"):
        load_inventory(p)
