"""YAML input for every file the operator writes: duplicate keys refused, errors name file and line."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from runbook.errors import InventoryError

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")  # not allowed by YAML 1.1


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: construct_mapping merges it; the explicit keys win
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # an unhashable key: construct_mapping below raises its own clear error
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# -- reading ---------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read ({exc.strerror or exc}); check the path "
                             "(invoke config runbook.inventory / INVOKE_RUNBOOK_INVENTORY)") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InventoryError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
                             "save the file as UTF-8") from None
    bad = _CONTROL.search(text)
    if bad:  # YAML allows none of them; PyYAML's reader would raise before any line is known
        at = bad.start()
        line, col = text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1
        what = "a NUL byte (0x00)" if bad.group() == "\x00" else f"a control character (0x{ord(bad.group()):02x})"
        raise InventoryError(f"{path}:{line}: {what} at line {line}, column {col}; a YAML file is plain text - "
                             "remove it (a binary or damaged file? restore it from its source)")
    return text


def _yaml_error(path: Path, exc: yaml.YAMLError) -> InventoryError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f"{path}:{mark.line + 1}: " if mark is not None else f"{path}: "
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if "'\\t'" in problem:
        return InventoryError(f"{where}invalid YAML{at}: a tab character; YAML indentation must use spaces, "
                              "not tabs - replace the tabs with spaces")
    if "expected a single document" in f"{problem} {context}":
        return InventoryError(f"{where}invalid YAML{at}: a second document ('---'); an inventory is one "
                              "document - remove the extra '---' and what follows, or merge the two")
    detail = f"{problem} ({context})" if context else problem
    return InventoryError(f"{where}invalid YAML{at}: {detail}; fix the syntax there (indentation, "
                          "unclosed brackets or quotes, a missing ':')")


def _key_repr(node: yaml.Node) -> object:
    return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else None


def _check_duplicates(path: Path, node: yaml.Node | None) -> None:
    """Refuse duplicate keys anywhere, naming the YAML path (``hosts.etcd02``) and both lines."""
    seen_nodes: set[int] = set()

    def walk(n: yaml.Node | None, where: list[str]) -> None:
        if n is None or id(n) in seen_nodes:  # aliases may share (or even contain) nodes
            return
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[object, int] = {}
            for k, v in n.value:
                key = _key_repr(k)
                if key is not None and k.tag != "tag:yaml.org,2002:merge":
                    if key in first:
                        dotted = ".".join([*where, str(k.value)])
                        raise InventoryError(
                            f"{path}:{k.start_mark.line + 1}: {dotted}: duplicate key {k.value!r} (first at "
                            f"line {first[key]}); YAML would silently keep only the last one - delete one "
                            "of them or rename it")
                    first[key] = k.start_mark.line + 1
                walk(v, [*where, str(k.value) if isinstance(k, yaml.ScalarNode) else "?"])
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, [*where, str(i)])

    walk(node, [])


def _parse(path: Path) -> tuple[object, yaml.Node | None]:
    """(data, node tree): the tree maps a YAML path back to its line for error messages."""
    text = _read_text(path)
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        _check_duplicates(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    finally:
        loader.dispose()
    return data, node


def load_yaml(path: Path) -> object:
    """Parse YAML with duplicate keys refused; errors name the file and line (an empty file is None)."""
    return _parse(Path(path))[0]


# -- schema ----------------------------------------------------------------------------------------
