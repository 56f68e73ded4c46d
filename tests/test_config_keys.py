"""Every key documented in the default config files is read by the engine.

A key in config/mta.toml (or config/shaping.toml) that no code reads looks like a
setting but changes nothing. For each documented key this test finds the typed field
that holds it and a read of that field in mta/: an attribute access `x.key` where `x`
is known to hold that section, because it is written `<...>.section.key`, or `x` is
annotated with the section's class, assigned from `<...>.section`, iterated from it
(`[[accounts]]`, `[[dkim.keys]]`), returned by a function annotated with the class, or
a parameter of a function that some call passes `<...>.section` to (matched by name).
The loaders (module-level functions of mta/config.py and mta/throttle/shaping.py) do
not count: reading a key in order to build the config is not using it.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from mta import config
from mta.throttle import shaping

ROOT = Path(__file__).resolve().parents[1]
LOADERS = {"mta/config.py", "mta/throttle/shaping.py"}


@dataclass(frozen=True)
class Section:
    """How code reaches one table of a config file: the class of the object holding it
    and the attribute names under which that object is found."""

    cls: type
    attrs: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...] = ()  # (key in the file, field of cls)

    def field_of(self, key: str) -> str:
        return dict(self.renamed).get(key, key)


_LIMITS = Section(shaping.Limits, ("limits", "default"))
_PROVIDER = Section(shaping.Provider, ("providers",))

MTA_SECTIONS: dict[str, Section] = {
    "engine": Section(config.EngineConfig, ("engine",)),
    "smtp": Section(config.SmtpConfig, ("smtp",)),
    "spool": Section(config.SpoolConfig, ("spool",)),
    "http": Section(config.HttpConfig, ("http",)),
    "dns": Section(config.DnsConfig, ("dns",)),
    "delivery": Section(config.DeliveryConfig, ("delivery",)),
    "dkim": Section(config.DkimConfig, ("dkim",)),
    "dkim.keys": Section(config.DkimKeyConfig, ("keys",)),
    "bounce": Section(config.BounceConfig, ("bounce",)),
    "throttle": Section(config.ThrottleConfig, ("throttle",)),
    "policy": Section(config.PolicyConfig, ("policy",)),
    "cluster": Section(config.ClusterConfig, ("cluster",)),
    "tlsrpt": Section(config.TlsReportConfig, ("tlsrpt",)),
    "inject": Section(config.InjectConfig, ("inject",)),
    "tracking": Section(config.TrackingConfig, ("tracking",)),
    "accounts": Section(config.AccountConfig, ("accounts",)),
    "windows": Section(config.WindowConfig, ("windows",)),
    "amqp": Section(config.AmqpConfig, ("amqp",)),
    "webhooks": Section(config.WebhookConfig, ("webhooks",)),
    "outbox": Section(config.OutboxConfig, ("outbox",)),
    "egress": Section(config.EgressConfig, ("egress",)),
    "egress.sources": Section(config.EgressSourceConfig, ("sources",)),
    "egress.pools": Section(config.EgressPoolConfig, ("pools",)),
    "egress.warmup": Section(config.EgressWarmupConfig, ("warmup",)),
}

SHAPING_SECTIONS: dict[str, Section] = {
    "adapt": Section(shaping.AdaptSettings, ("adapt",)),
    "default": _LIMITS,
    "domain": _LIMITS,
    "provider": _LIMITS,
    "rule": Section(shaping.Rule, ("rules",), (("regex", "pattern"),)),
}
PROVIDER_KEYS = {"mx_suffixes", "domains"}
NAMED_TABLES = ("domain", "provider")  # [domain."x"], [provider.x]: tables of tables


# --- the documented keys -----------------------------------------------------------


def toml_keys(text: str) -> Iterator[tuple[str, str]]:
    """(table, key) for every key of the file: the keys of `[[rule]]` tables and of
    `[domain."x"]` / `[provider.x]` by their table's name; the commented-out examples
    (`# [[accounts]]` and the `# key = value` lines under it) count as documented."""
    for table, value in tomllib.loads(text).items():
        for row in value if isinstance(value, list) else [value]:
            for key, item in row.items():
                if table in NAMED_TABLES:
                    yield from ((table, k) for k in item)
                else:
                    yield table, key
                if isinstance(item, dict) and f"{table}.{key}" in MTA_SECTIONS:
                    yield from ((f"{table}.{key}", k) for k in item)  # [egress.warmup]
    yield from commented_examples(text)


def commented_examples(text: str) -> Iterator[tuple[str, str]]:
    table = None
    for line in text.splitlines():
        header = re.fullmatch(r"#\s*\[\[([\w.]+)\]\]\s*", line)
        key = re.match(r"#\s*(\w+)\s*=", line)
        if header:
            table = header[1]
        elif table and key:
            yield table, key[1]
        else:
            table = None


def documented(path: str, sections: dict[str, Section]) -> list[tuple[str, str]]:
    text = (ROOT / path).read_text(encoding="utf-8")
    keys = sorted(set(toml_keys(text)))
    assert keys, f"no keys found in {path}"
    unknown = {table for table, _ in keys} - sections.keys()
    assert not unknown, f"{path}: tables {sorted(unknown)} have no Section in this test"
    return keys


MTA_KEYS = documented("config/mta.toml", MTA_SECTIONS)
SHAPING_KEYS = documented("config/shaping.toml", SHAPING_SECTIONS)


# --- where mta/ reads what ---------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """A name bound in a module: by a parameter, an assignment or a for loop."""

    names: tuple[str, ...]
    types: frozenset[str]  # the names its annotation mentions
    value: ast.expr | None  # what it is assigned or iterated from


@dataclass(frozen=True)
class ModuleFacts:
    bindings: tuple[Binding, ...]
    reads: frozenset[tuple[str, str]]  # (holder, attr) of every `holder.attr` read
    self_reads: dict[str, frozenset[str]]  # class name -> fields its methods read on self
    returns: dict[str, frozenset[str]]  # function name -> the names its annotation mentions
    params: dict[str, tuple[str, ...]]  # function name -> its parameters (not self, cls)
    calls: tuple[tuple[str, int | str, ast.expr], ...]  # (function, position or keyword, arg)


def type_names(annotation: ast.expr | None) -> frozenset[str]:
    if annotation is None:
        return frozenset()
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return frozenset(re.findall(r"\w+", annotation.value))
    return frozenset(n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(annotation)
                     if isinstance(n, ast.Name | ast.Attribute))


def target_names(target: ast.expr) -> tuple[str, ...]:
    if isinstance(target, ast.Name):
        return (target.id,)
    if isinstance(target, ast.Attribute):
        return (target.attr,)
    if isinstance(target, ast.Tuple | ast.List):
        return tuple(name for item in target.elts for name in target_names(item))
    return ()


def holder_name(value: ast.expr) -> str:
    if isinstance(value, ast.Attribute):
        return value.attr
    return value.id if isinstance(value, ast.Name) else ""


def binding(node: ast.AST) -> Binding | None:
    if isinstance(node, ast.arg):
        return Binding((node.arg,), type_names(node.annotation), None)
    if isinstance(node, ast.AnnAssign):
        return Binding(target_names(node.target), type_names(node.annotation), node.value)
    if isinstance(node, ast.Assign):
        names = tuple(n for t in node.targets for n in target_names(t))
        return Binding(names, frozenset(), node.value)
    if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
        return Binding(target_names(node.target), frozenset(), node.iter)
    return None


def counted_nodes(path: str, tree: ast.Module) -> Iterator[ast.AST]:
    """The nodes whose reads count: all of a module, or a loader's classes only."""
    if path not in LOADERS:
        yield from ast.walk(tree)
        return
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            yield from ast.walk(node)


def self_reads(tree: ast.Module) -> dict[str, frozenset[str]]:
    return {node.name: frozenset(
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name) and n.value.id == "self")
        for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return tuple(names[1:] if names[:1] in (["self"], ["cls"]) else names)


def call_args(node: ast.Call) -> Iterator[tuple[str, int | str, ast.expr]]:
    name = holder_name(node.func)
    yield from ((name, i, arg) for i, arg in enumerate(node.args))
    yield from ((name, k.arg, k.value) for k in node.keywords if k.arg)


def facts(path: str, tree: ast.Module) -> ModuleFacts:
    nodes = list(counted_nodes(path, tree))
    functions = [n for n in nodes if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    return ModuleFacts(
        bindings=tuple(b for b in map(binding, nodes) if b is not None),
        reads=frozenset((holder_name(n.value), n.attr) for n in nodes
                        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)),
        self_reads=self_reads(tree),
        returns={n.name: type_names(n.returns) for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)},
        params={n.name: parameters(n) for n in functions},
        calls=tuple(c for n in nodes if isinstance(n, ast.Call) for c in call_args(n)),
    )


@cache
def modules() -> dict[str, ModuleFacts]:
    found = {}
    for p in sorted((ROOT / "mta").rglob("*.py")):
        path = p.relative_to(ROOT).as_posix()
        found[path] = facts(path, ast.parse(p.read_text(encoding="utf-8")))
    return found


@cache
def returners(cls_name: str) -> frozenset[str]:
    """Functions and methods of mta/ annotated to return `cls_name` (or a list of it)."""
    return frozenset(name for module in modules().values()
                     for name, types in module.returns.items() if cls_name in types)


def holds(value: ast.expr | None, section: Section) -> bool:
    """True if `value` is `<...>.attr` for one of the section's attributes, or a call of a
    function that returns the section's class."""
    if isinstance(value, ast.Attribute):
        return value.attr in section.attrs
    if isinstance(value, ast.Call):
        return holder_name(value.func) in returners(section.cls.__name__)
    return False


@cache
def passed(section: Section) -> frozenset[tuple[str, int | str]]:
    """(function, position or keyword) of every call in mta/ that passes the section."""
    return frozenset((name, slot) for module in modules().values()
                     for name, slot, arg in module.calls if holds(arg, section))


def passed_params(module: ModuleFacts, section: Section) -> Iterator[str]:
    """Parameters of this module's functions that some call passes the section to."""
    for name, slot in passed(section):
        params = module.params.get(name, ())
        if isinstance(slot, int) and slot < len(params):
            yield params[slot]
        elif slot in params:
            yield str(slot)


def aliases(module: ModuleFacts, section: Section) -> set[str]:
    """Names (variables, parameters, attributes) that hold the section in this module."""
    cls_name = section.cls.__name__
    names = set(section.attrs).union(passed_params(module, section))
    for bound in module.bindings:
        if cls_name in bound.types or holds(bound.value, section):
            names.update(bound.names)
    return names


@cache
def fields_read(path: str, section: Section) -> frozenset[str]:
    """The fields of the section that this module of mta/ reads."""
    module = modules()[path]
    names = aliases(module, section)
    found = {attr for holder, attr in module.reads if holder in names}
    return frozenset(found | module.self_reads.get(section.cls.__name__, frozenset()))


def readers(section: Section, field: str) -> list[str]:
    """The modules of mta/ that read `field` of the section."""
    return [path for path in modules() if field in fields_read(path, section)]


def check_key(section: Section, where: str) -> None:
    field = section.field_of(where.rpartition(" ")[2])
    fields = {f.name for f in dataclasses.fields(section.cls)}
    assert field in fields, f"{where}: no field {field!r} in {section.cls.__qualname__}"
    assert readers(section, field), (
        f"{where} is documented but nothing in mta/ reads "
        f"{section.cls.__qualname__}.{field}: wire it or remove it")


# --- the tests ---------------------------------------------------------------------


@pytest.mark.parametrize(("table", "key"), MTA_KEYS, ids=[f"{t}.{k}" for t, k in MTA_KEYS])
def test_every_key_of_the_default_config_is_read(table: str, key: str) -> None:
    check_key(MTA_SECTIONS[table], f"config/mta.toml [{table}] {key}")


@pytest.mark.parametrize(("table", "key"), SHAPING_KEYS,
                         ids=[f"{t}.{k}" for t, k in SHAPING_KEYS])
def test_every_key_of_the_shaping_file_is_read(table: str, key: str) -> None:
    section = _PROVIDER if table == "provider" and key in PROVIDER_KEYS else SHAPING_SECTIONS[table]
    check_key(section, f"config/shaping.toml [{table}] {key}")


def test_every_field_of_the_config_is_documented() -> None:
    """The other way round: every setting of mta/config.py is in config/mta.toml."""
    documented_keys = set(MTA_KEYS)
    missing = [f"[{table}] {f.name}" for table, section in MTA_SECTIONS.items()
               for f in dataclasses.fields(section.cls) if (table, f.name) not in documented_keys]
    assert not missing, f"not documented in config/mta.toml: {', '.join(missing)}"


def test_an_unread_key_is_caught() -> None:
    """The check itself: the old [delivery] max_messages_per_connection, a field that
    only the shaping file's Limits is read for, would fail."""

    @dataclass
    class DeliveryConfig:
        max_messages_per_connection: int = 100

    with pytest.raises(AssertionError, match="nothing in mta/ reads"):
        check_key(Section(DeliveryConfig, ("delivery",)), "[delivery] max_messages_per_connection")
