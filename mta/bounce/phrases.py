"""The phrase tables (reasons.toml, senders.toml, receivers.toml), loaded once and compiled.

A phrase is a substring, or a tuple of fragments that must appear in that order. Phrases
are matched against ``normalize``d text; the tables may keep the writer's own casing, the
loader lowers them. Every phrase remembers who writes it (its group in the table), so an
explanation can say "Postfix's words" rather than only "a phrase".
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

Fragments = tuple[str, ...]


@lru_cache(maxsize=256)
def normalize(text: str) -> str:
    """Lower-case and collapse whitespace, the form every table expects."""
    return " ".join((text or "").split()).lower()


@dataclass(frozen=True)
class Said:
    """A phrase found in a text, and who writes it."""

    phrase: str
    writer: str


@dataclass(frozen=True)
class Phrases:
    """Phrases; ``find`` returns one the text contains (plain substrings tried first)."""

    plain: tuple[tuple[str, Said], ...] = ()
    aligned: tuple[tuple[Fragments, Said], ...] = ()
    excludes: tuple[str, ...] = ()

    def find(self, text: str) -> Said | None:
        if not text or any(e in text for e in self.excludes):
            return None
        for phrase, said in self.plain:
            if phrase in text:
                return said
        for fragments, said in self.aligned:
            if _aligned(text, fragments):
                return said
        return None


def _aligned(text: str, fragments: Fragments) -> bool:
    position = 0
    for part in fragments:
        found = text.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


def compile_phrases(groups: dict[str, list] | list, excludes: list[str] = ()) -> Phrases:
    """Phrases from ``{writer: [phrase, ...]}`` (or a bare list, writer unnamed)."""
    if isinstance(groups, list):
        groups = {"": groups}
    plain: list[tuple[str, Said]] = []
    aligned: list[tuple[Fragments, Said]] = []
    seen: set[Fragments] = set()
    for writer, items in groups.items():
        for item in items:
            fragments = _fragments(item)
            if not fragments or fragments in seen:
                continue
            seen.add(fragments)
            said = Said(_shown(item), writer)
            if len(fragments) == 1:
                plain.append((fragments[0], said))
            else:
                aligned.append((fragments, said))
    return Phrases(tuple(plain), tuple(aligned), tuple(normalize(e) for e in excludes))


def _fragments(item: str | list[str]) -> Fragments:
    parts = [item] if isinstance(item, str) else list(item)
    # keep the edge spaces: " is no longer valid." must not match "xis no longer valid."
    return tuple(_lowered(p) for p in parts if p.strip())


def _lowered(part: str) -> str:
    inner = normalize(part)
    return (" " if part[:1].isspace() else "") + inner + (" " if part[-1:].isspace() else "")


def _shown(item: str | list[str]) -> str:
    return item if isinstance(item, str) else " … ".join(p.strip() for p in item)


# --- reasons.toml ----------------------------------------------------------------------


@dataclass(frozen=True)
class Reason:
    """One entry of the reason taxonomy."""

    name: str
    kind: str
    status: tuple[str, str]
    codes: frozenset[str]
    phrases: Phrases
    decisive: Phrases


@dataclass(frozen=True)
class Book:
    reasons: dict[str, Reason]
    first: tuple[str, ...]
    second: tuple[str, ...]

    def said(self, reason: str, text: str) -> Said | None:
        entry = self.reasons.get(reason)
        return entry.phrases.find(text) if entry else None

    def decisive(self, reason: str, text: str) -> Said | None:
        entry = self.reasons.get(reason)
        return entry.decisive.find(text) if entry else None


def _load(name: str) -> dict:
    return tomllib.loads(resources.files("mta.bounce").joinpath(name).read_text("utf-8"))


@cache
def book() -> Book:
    data = _load("reasons.toml")
    reasons = {name: _reason(name, entry) for name, entry in data["reason"].items()}
    order = data["order"]
    return Book(reasons, tuple(order["first"]), tuple(order["second"]))


def _reason(name: str, entry: dict) -> Reason:
    permanent, temporary = entry.get("status", ["", ""])
    return Reason(
        name=name,
        kind=entry["kind"],
        status=(permanent, temporary),
        codes=frozenset(entry.get("codes", ())),
        phrases=compile_phrases(entry.get("phrases", {}), entry.get("excludes", [])),
        decisive=compile_phrases(entry.get("decisive", {})),
    )


# --- senders.toml / receivers.toml -------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """A sender family's or a provider's own wording, and its own codes.

    ``said`` holds every phrase of every reason in one list; a phrase's writer is the
    reason it means (the voice itself is the writer), so one look-up finds both.
    """

    name: str
    said: Phrases
    codes: tuple[tuple[CodeRange, str], ...] = ()

    def find(self, text: str) -> tuple[str, Said] | None:
        found = self.said.find(text)
        return (found.writer, Said(found.phrase, self.name)) if found else None

    def by_code(self, status: str) -> tuple[str, str] | None:
        for code_range, reason in self.codes:
            if code_range.holds(status):
                return reason, code_range.text
        return None


@dataclass(frozen=True)
class CodeRange:
    """'5.7.606-649' or '5.1.10': an enhanced status code, or a range of its last number."""

    text: str
    prefix: str
    low: int
    high: int

    def holds(self, status: str) -> bool:
        head, _, last = status.rpartition(".")
        if head + "." != self.prefix or not last.isdigit():
            return False
        return self.low <= int(last) <= self.high


def code_range(text: str) -> CodeRange:
    head, _, last = text.rpartition(".")
    low, _, high = last.partition("-")
    return CodeRange(text, head + ".", int(low), int(high or low))


@dataclass(frozen=True)
class Family(Voice):
    """A reporting MTA family recognised by its own marks (Sisimai's Lhost modules)."""

    marks: tuple[tuple[tuple[str, str], ...], ...] = ()
    local_only: bool = False
    at_rcpt: str = ""
    commands: tuple[tuple[str, Phrases], ...] = ()


@dataclass(frozen=True)
class Provider(Voice):
    """A receiving provider recognised by its hosts (Sisimai's Rhost modules)."""

    hosts: frozenset[str] = frozenset()  # host name suffixes, without a leading dot
    domains: frozenset[str] = frozenset()  # recipient domain suffixes


@dataclass(frozen=True)
class Agent(Voice):
    """A local delivery agent recognised by its marker in the error text."""

    otherwise: str = ""


def _voice_parts(entry: dict) -> dict:
    said = compile_phrases(entry.get("said", {}))  # grouped by reason: the writer is the reason
    codes = tuple((code_range(code), reason) for code, reason in entry.get("codes", {}).items())
    return {"said": said, "codes": codes}


@cache
def families() -> tuple[Family, ...]:
    data = _load("senders.toml")
    return tuple(
        Family(
            name=name,
            marks=tuple(_mark(m) for m in entry.get("marks", [])),
            local_only=bool(entry.get("local_only", False)),
            at_rcpt=entry.get("at_rcpt", ""),
            commands=tuple(
                (command, compile_phrases(items))
                for command, items in entry.get("commands", {}).items()
            ),
            **_voice_parts(entry),
        )
        for name, entry in data["family"].items()
    )


@cache
def mark_keys() -> frozenset[str]:
    """Every header name the families' marks read."""
    return frozenset(key for family in families() for mark in family.marks for key, _ in mark)


def _mark(mark: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((key.lower(), value.lower()) for key, value in mark.items())


@cache
def agents() -> tuple[dict[str, Agent], Phrases]:
    """The agents by name, and every agent's markers in one list (the writer is the agent)."""
    data = _load("senders.toml")["agent"]
    by_name = {
        name: Agent(name=name, otherwise=entry.get("otherwise", ""), **_voice_parts(entry))
        for name, entry in data.items()
    }
    markers = compile_phrases({name: entry["markers"] for name, entry in data.items()})
    return by_name, markers


@cache
def providers() -> tuple[Provider, ...]:
    data = _load("receivers.toml")
    return tuple(
        Provider(
            name=name,
            hosts=frozenset(h.lower().lstrip(".") for h in entry.get("hosts", [])),
            domains=frozenset(d.lower().lstrip(".") for d in entry.get("domains", [])),
            **_voice_parts(entry),
        )
        for name, entry in data["provider"].items()
    )
