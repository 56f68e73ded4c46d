"""Bench scenarios: the load and the receiving world, as TOML files in this folder.

A scenario names the load (count or duration, sessions, rate), the messages (sizes,
recipients, accounts, campaigns), the destination domains (a few large providers and
a long tail), the sinks that receive them, an optional throttling receiver, and
settings for the engine and for Postfix. `load_scenario("steady")` reads
`steady.toml`; every key is optional and defaults to the steady bulk load.

`Traffic` turns a scenario into submissions for bench.load.run_load and keeps, per
message index, how many recipients the sinks should receive (`Planned`): the rig
matches what arrives at the sinks (by the X-Bench-Index header) against it.
"""

from __future__ import annotations

import random
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bench.load import Submission

SCENARIO_DIR = Path(__file__).resolve().parent
INDEX_HEADER = "X-Bench-Index"
DOMAIN_SUFFIX = "bench.test"
UNKNOWN_PREFIX = "nouser"
UNKNOWN_REPLY = "550 5.1.1 <{address}>: Recipient address rejected: User unknown"
LINE = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghij.\r\n"
PREPARED_BYTES = 512 * 2**20  # submissions composed before a run starts, at most


class ScenarioError(Exception):
    """A scenario file that cannot be used; str() names the file and the key."""


@dataclass
class LoadSpec:
    count: int = 20000
    sessions: int = 20
    messages_per_session: int = 1000
    rate: float = 0.0  # messages/s overall; 0: as fast as possible
    duration: float = 0.0  # seconds; > 0: send for this long instead of `count` messages
    drain_timeout: float = 300.0  # after the load, wait at most this long for the sinks
    stall_timeout: float = 60.0  # ... and give up earlier when nothing arrives for this long
    seed: int = 1


@dataclass
class MessageSpec:
    sizes: list[list[float]] = field(default_factory=lambda: [[4096, 1.0]])  # [bytes, weight]
    recipients: list[list[float]] = field(default_factory=lambda: [[1, 1.0]])  # [n, weight]
    sender_domain: str = "sender.bench.test"
    accounts: int = 1
    campaigns: int = 5
    campaign_order: str = "mixed"  # "mixed": i % campaigns; "sequential": blocks
    campaign_size: int = 0  # "sequential": messages per campaign (0: count / campaigns)
    html: bool = False  # multipart/alternative: a text part and an HTML part with links


@dataclass
class DomainSpec:
    count: int = 100
    providers: int = 0  # the first N domains are large providers ...
    provider_share: float = 0.0  # ... that get this share of the recipients (Zipf among them)
    unknown_share: float = 0.0  # recipients the sinks refuse with 550 5.1.1


@dataclass
class SinkSpec:
    kind: str = "smtp-sink"  # or "asyncio" (our sink: per-recipient refusals)
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.2", "127.0.0.3",
                                                      "127.0.0.4", "127.0.0.5"])


@dataclass
class ThrottleSpec:
    enabled: bool = False
    host: str = "127.0.0.6"
    providers: int = 1  # the first N provider domains are served by the throttling MX
    max_connections: int = 4
    rate: float = 100.0
    schedule: list[list[float]] = field(default_factory=list)  # [[seconds, rate], ...]


@dataclass
class Scenario:
    name: str = "steady"
    description: str = ""
    load: LoadSpec = field(default_factory=LoadSpec)
    messages: MessageSpec = field(default_factory=MessageSpec)
    domains: DomainSpec = field(default_factory=DomainSpec)
    sinks: SinkSpec = field(default_factory=SinkSpec)
    throttle: ThrottleSpec = field(default_factory=ThrottleSpec)
    engine: dict[str, Any] = field(default_factory=dict)  # merged into the engine's config
    shaping: dict[str, Any] = field(default_factory=dict)  # the engine's shaping file
    postfix: dict[str, str] = field(default_factory=dict)  # extra main.cf settings


_SECTIONS: dict[str, type] = {"load": LoadSpec, "messages": MessageSpec, "domains": DomainSpec,
                              "sinks": SinkSpec, "throttle": ThrottleSpec}
_FREE_TABLES = ("engine", "shaping", "postfix")


def list_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def scenario_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    path = SCENARIO_DIR / f"{name}.toml"
    if not path.exists():
        raise ScenarioError(f"no scenario {name!r}; known: {', '.join(list_scenarios())}")
    return path


def load_scenario(name: str) -> Scenario:
    path = scenario_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_scenario(raw, path.stem)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


def parse_scenario(raw: dict[str, Any], name: str) -> Scenario:
    scenario = Scenario(name=name, description=str(raw.get("description", "")))
    for key, value in raw.items():
        if key in _SECTIONS:
            setattr(scenario, key, _section(_SECTIONS[key], value, key))
        elif key in _FREE_TABLES:
            if not isinstance(value, dict):
                raise ScenarioError(f"[{key}] must be a table")
            setattr(scenario, key, value)
        elif key != "description":
            raise ScenarioError(f"unknown key {key!r}")
    validate(scenario)
    return scenario


def _section(cls: type, values: Any, name: str) -> Any:
    if not isinstance(values, dict):
        raise ScenarioError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ScenarioError(f"unknown key [{name}] {key}")
        default = getattr(cls(), key)
        if isinstance(default, bool) != isinstance(value, bool) or not isinstance(
                value, type(default) if not isinstance(default, float) else (int, float)):
            raise ScenarioError(f"[{name}] {key} must be {type(default).__name__}")
    return cls(**values)


def validate(s: Scenario) -> None:
    if s.sinks.kind not in ("smtp-sink", "asyncio"):
        raise ScenarioError("[sinks] kind must be 'smtp-sink' or 'asyncio'")
    if s.domains.unknown_share and s.sinks.kind != "asyncio":
        raise ScenarioError("[domains] unknown_share needs [sinks] kind = 'asyncio'")
    if s.messages.campaign_order not in ("mixed", "sequential"):
        raise ScenarioError("[messages] campaign_order must be 'mixed' or 'sequential'")
    if s.throttle.enabled and s.throttle.providers > s.domains.providers:
        raise ScenarioError("[throttle] providers exceeds [domains] providers")
    for key in ("sizes", "recipients"):
        pairs = getattr(s.messages, key)
        if not pairs or any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in pairs):
            raise ScenarioError(f"[messages] {key} must be [[value >= 1, weight >= 0], ...]")
    if min(s.load.count, s.load.sessions, s.domains.count, len(s.sinks.hosts)) < 1:
        raise ScenarioError("count, sessions, domains and sink hosts must be at least 1")


# --- the destination world -----------------------------------------------------------


@dataclass
class Destinations:
    """Test domains, their share of the recipients and the address of their MX."""

    domains: list[str]
    weights: list[float]
    routes: dict[str, str]  # domain -> MX address
    throttled: frozenset[str] = frozenset()


def destinations(s: Scenario) -> Destinations:
    names = [f"d{i:04d}.{DOMAIN_SUFFIX}" for i in range(s.domains.count)]
    weights = domain_weights(s.domains.count, s.domains.providers, s.domains.provider_share)
    hosts = s.sinks.hosts
    routes = {name: hosts[i % len(hosts)] for i, name in enumerate(names)}
    throttled = frozenset(names[: s.throttle.providers] if s.throttle.enabled else ())
    for name in throttled:
        routes[name] = s.throttle.host
    routes[s.messages.sender_domain] = hosts[0]  # bounces and DSNs land somewhere too
    return Destinations(names, weights, routes, throttled)


def domain_weights(count: int, providers: int, provider_share: float) -> list[float]:
    """Zipf weights for the first `providers` domains, summing to `provider_share`;
    the rest of the recipients spread evenly over the long tail."""
    providers = min(providers, count)
    if providers == 0 or provider_share <= 0:
        return [1.0 / count] * count
    zipf = [1.0 / (k + 1) for k in range(providers)]
    head = [provider_share * z / sum(zipf) for z in zipf]
    tail_count = count - providers
    tail = [(1.0 - provider_share) / tail_count] * tail_count if tail_count else []
    return head + tail


# --- the traffic ---------------------------------------------------------------------


@dataclass
class Planned:
    """What the sinks should receive of one message."""

    recipients: int  # deliverable recipients at the recording sinks
    throttled: int  # transactions expected at the throttling MX


class Traffic:
    """Submissions for run_load, and the plan to check arrivals against."""

    def __init__(self, scenario: Scenario, dest: Destinations, run_id: str = "") -> None:
        self.s = scenario
        self.dest = dest
        self.run_id = run_id or f"{int(time.time()):x}"
        self.rng = random.Random(scenario.load.seed)
        self.plan: dict[int, Planned] = {}
        fill = html_filler if scenario.messages.html else filler
        self._bodies = {int(size): fill(int(size)) for size, _ in scenario.messages.sizes}
        self._ctype = (f'multipart/alternative; boundary="{BOUNDARY}"' if scenario.messages.html
                       else "text/plain; charset=utf-8")
        self._sizes = [int(size) for size, _ in scenario.messages.sizes]
        self._size_weights = [w for _, w in scenario.messages.sizes]
        self._counts = [int(n) for n, _ in scenario.messages.recipients]
        self._count_weights = [w for _, w in scenario.messages.recipients]
        self._date = ("", 0)
        self._prepared: list[Submission] = []

    def campaign(self, i: int) -> tuple[str, str]:
        """(account, campaign) of message i."""
        m = self.s.messages
        if m.campaign_order == "sequential":
            size = m.campaign_size or max(1, self.s.load.count // max(1, m.campaigns))
            number = i // size
        else:
            number = i % max(1, m.campaigns)
        account = account_name(number % max(1, m.accounts))
        return account, f"{account}-c{number}"

    def recipients(self, i: int) -> list[str]:
        n = self.rng.choices(self._counts, self._count_weights)[0]
        domains = self.rng.choices(self.dest.domains, self.dest.weights, k=n)
        unknown = self.s.domains.unknown_share
        return [f"{UNKNOWN_PREFIX if self.rng.random() < unknown else 'u'}{i}.{k}@{d}"
                for k, d in enumerate(domains)]

    def plan_for(self, rcpts: Sequence[str]) -> Planned:
        good = [r for r in rcpts if not r.startswith(UNKNOWN_PREFIX)]
        throttled = {r.rpartition("@")[2] for r in good} & self.dest.throttled
        recorded = [r for r in good if r.rpartition("@")[2] not in self.dest.throttled]
        return Planned(len(recorded), len(throttled))

    def prepare(self, count: int, budget: int = PREPARED_BYTES) -> None:
        """Compose the first `count` submissions now, before the clock starts, if they fit
        in `budget` bytes: the load generator shares the machine with the MTA it
        measures, and composing a message (its random draws and headers) costs the
        generator about as much CPU as sending it."""
        if count > 0 and count * max(self._sizes) <= budget:
            self._prepared = [self._compose(i) for i in range(count)]

    def submission(self, i: int) -> Submission:
        if i < len(self._prepared):
            return self._prepared[i]
        return self._compose(i)

    def _compose(self, i: int) -> Submission:
        rcpts = self.recipients(i)
        self.plan[i] = self.plan_for(rcpts)
        account, campaign = self.campaign(i)
        sender = f"{account}@{self.s.messages.sender_domain}"
        size = self.rng.choices(self._sizes, self._size_weights)[0]
        return Submission(sender, rcpts, self.headers(i, sender, rcpts[0], campaign)
                          + self._bodies[size])

    def headers(self, i: int, sender: str, rcpt: str, campaign: str) -> bytes:
        return (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {campaign} message {i}\r\n"
                f"Date: {self.date()}\r\nMessage-ID: <{i}.{self.run_id}@{DOMAIN_SUFFIX}>\r\n"
                f"MIME-Version: 1.0\r\nContent-Type: {self._ctype}\r\n"
                f"X-Campaign-ID: {campaign}\r\n{INDEX_HEADER}: {i}\r\n\r\n").encode()

    def date(self) -> str:
        now = int(time.time())
        if self._date[1] != now:
            self._date = (time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now)), now)
        return self._date[0]


def account_name(k: int) -> str:
    return f"acct{k}"


def filler(size: int) -> bytes:
    """A body of CRLF text lines so that, with ~290 bytes of headers, the message has
    about `size` bytes."""
    body_len = max(len(LINE), size - 290)
    whole, rest = divmod(body_len, len(LINE))
    return LINE * whole + (LINE[: rest - 2] + b"\r\n" if rest > 2 else b"")


BOUNDARY = "=_bench_alternative"
LINKS = ["https://shop.bench.test/spring?utm=mail", "https://shop.bench.test/p/42",
         "http://blog.bench.test/news"]


def html_filler(size: int) -> bytes:
    """A multipart/alternative body of about `size` bytes with its headers: a text part and
    an HTML part (three links, and a placeholder-free layout), each about half."""
    half = max(len(LINE), (size - 290 - 260) // 2)
    text = f"Spring sale: {LINKS[0]}\r\n".encode()
    text += LINE * max(0, (half - len(text)) // len(LINE))
    links = "".join(f'<p><a href="{u}">offer {i}</a></p>\r\n' for i, u in enumerate(LINKS))
    para = b"<p>" + LINE[:-2] + b"</p>\r\n"
    body = b"<html><body>\r\n" + links.encode()
    body += para * max(0, (half - len(body) - 17) // len(para)) + b"</body></html>\r\n"
    return (f"--{BOUNDARY}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".encode()
            + text + f"\r\n--{BOUNDARY}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            .encode() + body + f"\r\n--{BOUNDARY}--\r\n".encode())


def index_of(data: bytes) -> int | None:
    """The X-Bench-Index of a message as received (top-level headers only), if any."""
    head = b"\n" + data.split(b"\r\n\r\n", 1)[0]
    marker = b"\n" + INDEX_HEADER.encode() + b": "
    at = head.find(marker)
    if at < 0:
        return None
    end = head.find(b"\r", at + len(marker))
    value = head[at + len(marker): end if end >= 0 else None]
    return int(value) if value.isdigit() else None
