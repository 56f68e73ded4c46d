"""Traffic shaping as data: limits per domain and per provider, adaptation settings, rules.

The shaping file (TOML, see config/shaping.toml) has these tables:

- ``[default]`` limits for every destination;
- ``[domain."example.com"]`` overrides for one recipient domain;
- ``[provider.NAME]`` with ``mx_suffixes`` (and optionally ``domains``): every domain whose
  MX host ends in one of the suffixes shares this provider's limits;
- ``[adapt]`` how the limits adapt to "slow down" replies;
- ``[[rule]]`` automation: a regex on replies, a trigger, an action and a duration.

Limits in the file are engine-wide; `mta.throttle.Throttle` gives each worker its share.
`load_shaping` validates everything and raises `ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.config import ConfigError, build_section
from mta.throttle.units import Rate, parse_duration, parse_rate

ACTIONS = ("suspend", "throttle", "suspend_campaign", "suspend_account")
UNLIMITED = ("", "unlimited", "none")


@dataclass(frozen=True)
class Limits:
    """The ceiling for one destination (domain or provider), engine-wide."""

    max_connections: int = 10
    max_messages_per_connection: int = 100
    message_rate: Rate | None = None  # None: no rate limit
    connection_rate: Rate | None = None
    message_burst: int = 0  # messages allowed at once; 0: 1 + 100 ms worth of the rate


@dataclass(frozen=True)
class Provider:
    name: str
    mx_suffixes: tuple[str, ...]  # normalized: lower case, leading dot, no trailing dot
    domains: tuple[str, ...]
    limits: Limits

    def matches_mx(self, host: str) -> bool:
        return any(host.endswith(s) or host == s[1:] for s in self.mx_suffixes)


@dataclass(frozen=True)
class Trigger:
    count: int = 1  # matches needed ...
    within: float = 0.0  # ... within this many seconds (0 with count 1: immediate)


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    trigger: Trigger
    action: str  # one of ACTIONS
    duration: float
    rate: Rate | None = None  # throttle: the lower message rate
    max_connections: int | None = None  # throttle: the lower connection count
    provider: str | None = None  # only for destinations of this provider


@dataclass(frozen=True)
class AdaptSettings:
    decrease: float = 0.7  # multiply rate and connections by this on "slow down"
    holdoff: float = 2.0  # at most one cut per holdoff: replies already in flight are one event
    increase_after: int = 10  # successes needed before a raise ...
    increase_interval: float = 1.0  # ... and seconds since the last change
    probe_step: float = 0.05  # above the last cut point: raise by this share, doubling each time
    max_probe_step: float = 0.5
    min_message_rate: Rate = Rate(1, 60)  # the floor of the adapted message rate
    min_connections: int = 1
    retry_delay: float = 1.0  # a "slow down" deferral is retried this soon, at the adapted pace
    restore_after: float = 600.0  # no "slow down" for this long: an unlimited rate is unlimited again
    forget_after: float = 3600.0  # idle destinations' adapted state is forgotten after this


@dataclass(frozen=True)
class Shaping:
    default: Limits = field(default_factory=Limits)
    domains: Mapping[str, Limits] = field(default_factory=dict)  # merged over default
    providers: tuple[Provider, ...] = ()
    rules: tuple[Rule, ...] = ()
    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    source: str = "<built-in>"

    def provider(self, domain: str, mx_hosts: list[str]) -> Provider | None:
        """The provider serving `domain`: by its MX hosts (in order), else by its name."""
        for host in mx_hosts:
            host = host.lower().rstrip(".")
            for provider in self.providers:
                if provider.matches_mx(host):
                    return provider
        return next((p for p in self.providers if domain in p.domains), None)


# --- the file's tables, as the TOML has them --------------------------------------------


@dataclass
class _LimitsTable:
    max_connections: int | None = None
    max_messages_per_connection: int | None = None
    message_rate: str | None = None
    connection_rate: str | None = None
    message_burst: int | None = None


@dataclass
class _ProviderTable(_LimitsTable):
    mx_suffixes: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)


@dataclass
class _RuleTable:
    regex: str
    action: str
    duration: str | int | float
    trigger: str | dict[str, Any] = "immediate"
    name: str = ""
    rate: str | None = None
    max_connections: int | None = None
    provider: str | None = None


@dataclass
class _TriggerTable:
    count: int
    within: str | int | float


@dataclass
class _AdaptTable:
    decrease: float | None = None
    holdoff: str | int | float | None = None
    increase_after: int | None = None
    increase_interval: str | int | float | None = None
    probe_step: float | None = None
    max_probe_step: float | None = None
    min_message_rate: str | None = None
    min_connections: int | None = None
    retry_delay: str | int | float | None = None
    restore_after: str | int | float | None = None
    forget_after: str | int | float | None = None


_SECTIONS = ("default", "domain", "provider", "adapt", "rule")


def load_shaping(path: str | Path) -> Shaping:
    """Read and validate a shaping file; "" gives the built-in defaults (no providers)."""
    if not str(path):
        return Shaping()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"shaping file {str(p)!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"shaping file {str(p)!r} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"shaping file {str(p)!r} is not valid TOML: {exc}") from None
    return parse_shaping(raw, str(p))


def parse_shaping(raw: dict[str, Any], source: str = "<shaping>") -> Shaping:
    """Validate a parsed shaping file; ConfigError names the file and the bad key."""
    try:
        return _parse(raw, source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _parse(raw: dict[str, Any], source: str) -> Shaping:
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"unknown section [{key}]")
    default_table = _limits_table(raw.get("default", {}), "[default]")
    default = _limits(default_table)
    domains = {
        name.lower().rstrip("."): _limits({**default_table, **_limits_table(t, f'[domain."{name}"]')})
        for name, t in _table(raw.get("domain", {}), "[domain]").items()
    }
    providers = tuple(
        _provider(name, t, default_table)
        for name, t in _table(raw.get("provider", {}), "[provider]").items()
    )
    rules_raw = raw.get("rule", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("rule must be written as [[rule]] tables")
    names = {p.name for p in providers}
    rules = tuple(_rule(i, t, names) for i, t in enumerate(rules_raw, 1))
    adapt = _adapt(raw.get("adapt", {}))
    return Shaping(default, domains, providers, rules, adapt, source)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {value!r}")
    return value


def _checked(where: str, key: str, value: Any, check: Callable[[Any], Any]) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise ConfigError(f"{where} {key}: {exc}") from None


def _positive_int(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _optional_rate(value: str) -> Rate | None:
    return None if value.strip().lower() in UNLIMITED else parse_rate(value)


def _share(value: float) -> float:
    if not 0 < value < 1:
        raise ValueError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


_LIMIT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "max_connections": _positive_int,
    "max_messages_per_connection": _positive_int,
    "message_rate": _optional_rate,
    "connection_rate": _optional_rate,
    "message_burst": _non_negative,
}


def _limits_table(value: Any, where: str, cls: type = _LimitsTable) -> dict[str, Any]:
    """The limit keys set in one table, validated; other keys of `cls` are dropped."""
    table = build_section(cls, _table(value, where), where)
    out: dict[str, Any] = {}
    for key, check in _LIMIT_CHECKS.items():
        raw = getattr(table, key)
        if raw is not None:
            out[key] = _checked(where, key, raw, check)
    return out


def _limits(values: dict[str, Any]) -> Limits:
    return Limits(**values)


def _provider(name: str, value: Any, default_table: dict[str, Any]) -> Provider:
    where = f"[provider.{name}]"
    limits = _limits_table(value, where, _ProviderTable)
    table = build_section(_ProviderTable, value, where)
    suffixes = tuple("." + s.lower().strip(".") for s in table.mx_suffixes if s.strip("."))
    if not suffixes and not table.domains:
        raise ConfigError(f"{where} mx_suffixes: a provider needs mx_suffixes or domains")
    domains = tuple(d.lower().rstrip(".") for d in table.domains)
    return Provider(name, suffixes, domains, _limits({**default_table, **limits}))


def _trigger(value: str | dict[str, Any], where: str) -> Trigger:
    if isinstance(value, str):
        if value != "immediate":
            raise ConfigError(f"{where} trigger: must be \"immediate\" or {{count = N, within = \"5m\"}}")
        return Trigger()
    table = build_section(_TriggerTable, value, f"{where} trigger")
    count = _checked(where, "trigger.count", table.count, _positive_int)
    within = _checked(where, "trigger.within", table.within, parse_duration)
    if count > 1 and within <= 0:
        raise ConfigError(f"{where} trigger.within: must be a positive duration")
    return Trigger(count, within)


def _rule(index: int, value: Any, providers: set[str]) -> Rule:
    where = f"[[rule]] #{index}"
    table = build_section(_RuleTable, _table(value, where), where)
    if table.name:
        where = f"[[rule]] #{index} ({table.name})"
    try:
        pattern = re.compile(table.regex, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"{where} regex: {exc}") from None
    if table.action not in ACTIONS:
        raise ConfigError(f"{where} action: must be one of {', '.join(ACTIONS)}, got {table.action!r}")
    duration = _checked(where, "duration", table.duration, parse_duration)
    if duration <= 0:
        raise ConfigError(f"{where} duration: must be positive")
    rate = None if table.rate is None else _checked(where, "rate", table.rate, parse_rate)
    max_conn = table.max_connections
    if max_conn is not None:
        _checked(where, "max_connections", max_conn, _positive_int)
    if table.action == "throttle" and rate is None and max_conn is None:
        raise ConfigError(f"{where} rate: a throttle rule needs rate or max_connections")
    if table.action != "throttle" and (rate is not None or max_conn is not None):
        raise ConfigError(f"{where} rate: only a throttle rule takes rate or max_connections")
    if table.provider is not None and table.provider not in providers:
        raise ConfigError(f"{where} provider: no [provider.{table.provider}] in this file")
    trigger = _trigger(table.trigger, where)
    return Rule(table.name or f"rule{index}", pattern, trigger, table.action, duration,
                rate, max_conn, table.provider)


_ADAPT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "decrease": _share,
    "holdoff": parse_duration,
    "increase_after": _positive_int,
    "increase_interval": parse_duration,
    "probe_step": _share,
    "max_probe_step": _share,
    "min_message_rate": parse_rate,
    "min_connections": _positive_int,
    "retry_delay": parse_duration,
    "restore_after": parse_duration,
    "forget_after": parse_duration,
}


def _adapt(value: Any) -> AdaptSettings:
    table = build_section(_AdaptTable, _table(value, "[adapt]"), "[adapt]")
    values = {
        key: _checked("[adapt]", key, getattr(table, key), check)
        for key, check in _ADAPT_CHECKS.items()
        if getattr(table, key) is not None
    }
    return dataclasses.replace(AdaptSettings(), **values)
