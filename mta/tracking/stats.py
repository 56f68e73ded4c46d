"""Engagement counters per campaign and per account, kept in the spool's LMDB.

- ``tracking.count``  ``C<account>\\0<campaign>`` / ``A<account>`` -> counters (msgpack
  dict): ``opens_human``, ``opens_machine``, ``clicks_human``, ``clicks_machine`` (every
  request) and ``unique_opens``, ``unique_clicks`` (recipients, humans only);
  ``L<account>\\0<campaign>\\0<url>`` -> [human clicks, machine clicks] of one link
- ``tracking.seen``   ``<o|c>\\0<account>\\0<campaign>\\0<recipient>`` -> b"": a recipient
  whose human open or click was counted, so it counts once as unique

Written in batches through the group committer by the process serving the tracking
endpoints (`Tracker`), read by `engagement` for `mta campaign show` and the admin API.
`deltas_of` is what a batch adds, before the check of who counted already: the same for
this node's LMDB (`apply_events`) and the cluster's Redis (mta.cluster.engagement).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mta.queue.spool import Spool, pack, unpack

COUNT_DB, SEEN_DB = "tracking.count", "tracking.seen"
FIELDS = ("opens_human", "opens_machine", "clicks_human", "clicks_machine", "unique_opens",
          "unique_clicks")
TOP_LINKS = 10


def open_dbs(spool: Spool) -> None:
    """Open (or create) the two databases before any transaction uses them."""
    spool.open_db(COUNT_DB)
    spool.open_db(SEEN_DB)


def clean_name(name: str) -> bytes:
    return name.replace("\0", "").encode("utf-8", "replace")


def _pair(account: str, campaign: str) -> bytes:
    return clean_name(account) + b"\0" + clean_name(campaign)


@dataclass(frozen=True, slots=True)
class Mark:
    """A person's open or click: counted as unique (`field` on `keys`) if `seen` is new."""

    seen: bytes  # the tracking.seen key
    field: str  # unique_opens | unique_clicks
    keys: tuple[bytes, bytes]  # the campaign's and the account's counters


@dataclass
class Deltas:
    counts: dict[bytes, Counter[str]] = field(default_factory=dict)  # every request
    links: dict[bytes, list[int]] = field(default_factory=dict)  # L key -> [human, machine]
    marks: list[Mark] = field(default_factory=list)  # unique if not seen before


def mark_of(kind: str, account: str, campaign: str, recipient: str) -> Mark:
    """`kind`: "opens" or "clicks"."""
    seen = kind[0].encode() + b"\0" + _pair(account, campaign) + b"\0" + clean_name(
        recipient.lower())
    return Mark(seen, f"unique_{kind}", (b"C" + _pair(account, campaign),
                                         b"A" + clean_name(account)))


def deltas_of(events: list[dict[str, Any]]) -> Deltas:
    """What decided Open and Click events add to the counters."""
    out = Deltas()
    for e in events:
        kind = "opens" if e["type"] == "Open" else "clicks"
        human = e["class"] == "human"
        account, campaign = str(e.get("account", "")), str(e.get("campaign", ""))
        for key in (b"C" + _pair(account, campaign), b"A" + clean_name(account)):
            out.counts.setdefault(key, Counter())[f"{kind}_{e['class']}"] += 1
        if human:
            out.marks.append(mark_of(kind, account, campaign, str(e.get("recipient", ""))))
        if kind == "clicks" and e.get("link"):
            link = b"L" + _pair(account, campaign) + b"\0" + clean_name(str(e["link"]))[:2000]
            pair = out.links.setdefault(link, [0, 0])
            pair[0 if human else 1] += 1
    return out


def apply_events(spool: Spool, txn: Any, events: list[dict[str, Any]]) -> None:
    """Count decided Open and Click events (in the committer's write transaction)."""
    count, seen = spool.dbs[COUNT_DB], spool.dbs[SEEN_DB]
    deltas = deltas_of(events)
    changes, links = deltas.counts, deltas.links
    for mark in deltas.marks:
        if txn.put(mark.seen, b"", db=seen, overwrite=False):
            for key in mark.keys:
                changes[key][mark.field] += 1
    for key, bump in changes.items():
        old = txn.get(key, db=count)
        values = Counter(unpack(old) if old else {})
        values.update(bump)
        txn.put(key, pack(dict(values)), db=count)
    for key, (human, machine) in links.items():
        old = txn.get(key, db=count)
        was = unpack(old) if old else [0, 0]
        txn.put(key, pack([was[0] + human, was[1] + machine]), db=count)


def counters(spool: Spool, txn: Any, key: bytes) -> dict[str, int]:
    db = spool.dbs.get(COUNT_DB)
    raw = txn.get(key, db=db) if db is not None else None
    found = unpack(raw) if raw else {}
    return {name: int(found.get(name, 0)) for name in FIELDS}


def top_links(spool: Spool, txn: Any, account: str, campaign: str, limit: int = TOP_LINKS
              ) -> list[dict[str, Any]]:
    db = spool.dbs.get(COUNT_DB)
    if db is None:
        return []
    prefix = b"L" + _pair(account, campaign) + b"\0"
    found = []
    with txn.cursor(db=db) as cursor:
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                human, machine = unpack(value)
                found.append(link_row(key[len(prefix):], human, machine))
    return ranked(found, limit)


def link_row(url: bytes, human: int, machine: int) -> dict[str, Any]:
    return {"url": url.decode("utf-8", "replace"), "clicks_human": int(human),
            "clicks_machine": int(machine)}


def ranked(links: list[dict[str, Any]], limit: int = TOP_LINKS) -> list[dict[str, Any]]:
    """The most clicked links: by people first, then by machines."""
    links.sort(key=lambda link: (-link["clicks_human"], -link["clicks_machine"], link["url"]))
    return links[:limit]


def local_copy(spool: Spool, txn: Any) -> tuple[Deltas, int]:
    """Everything this node counted, as deltas to add to an empty cluster copy (the
    unique counts come back from the marks), and the number of records read."""
    out = Deltas()
    records = 0
    for key, value in _items(txn, spool.dbs.get(COUNT_DB)):
        records += 1
        if key[:1] == b"L":
            out.links[key] = list(unpack(value))
        else:
            found = unpack(value)
            out.counts[key] = Counter({name: int(found.get(name, 0)) for name in FIELDS
                                       if not name.startswith("unique_")})
    for key, _ in _items(txn, spool.dbs.get(SEEN_DB)):
        records += 1
        kind, account, campaign, _rest = (key.split(b"\0", 3) + [b"", b"", b""])[:4]
        name = {b"o": "unique_opens", b"c": "unique_clicks"}.get(kind)
        if name is not None:
            out.marks.append(Mark(key, name, (b"C" + account + b"\0" + campaign,
                                              b"A" + account)))
    return out, records


def _items(txn: Any, db: Any) -> Iterator[tuple[bytes, bytes]]:
    if db is None:
        return
    with txn.cursor(db=db) as cursor:
        for key, value in cursor:
            yield bytes(key), bytes(value)


def with_rates(values: dict[str, int], delivered: int) -> dict[str, Any]:
    """The counters with their totals and rates over delivered mail (humans only)."""
    out: dict[str, Any] = dict(values)
    out["opens_total"] = values["opens_human"] + values["opens_machine"]
    out["clicks_total"] = values["clicks_human"] + values["clicks_machine"]
    out["open_rate"] = round(values["unique_opens"] / delivered, 6) if delivered else 0.0
    out["click_rate"] = round(values["unique_clicks"] / delivered, 6) if delivered else 0.0
    out["click_to_open"] = (round(values["unique_clicks"] / values["unique_opens"], 6)
                            if values["unique_opens"] else 0.0)
    return out


def engagement(spool: Spool, txn: Any, account: str, campaign: str, delivered: int
               ) -> dict[str, Any]:
    """A campaign's opens, clicks, rates and top links for `mta campaign show` and the API."""
    stats = with_rates(counters(spool, txn, b"C" + _pair(account, campaign)), delivered)
    stats["top_links"] = top_links(spool, txn, account, campaign)
    return stats


def account_engagement(spool: Spool, txn: Any, account: str, delivered: int) -> dict[str, Any]:
    return with_rates(counters(spool, txn, b"A" + clean_name(account)), delivered)


def purge_account(store: Any, txn: Any, account: str) -> int:
    """Every engagement record of `account` (the retention purge): its counters, link
    counts and the recipients counted as unique. `store`: a PolicyStore (delete_prefix)."""
    count, seen = store.spool.dbs.get(COUNT_DB), store.spool.dbs.get(SEEN_DB)
    name = clean_name(account)
    removed = (store.delete_prefix(txn, count, b"C" + name + b"\0")
               + store.delete_prefix(txn, count, b"L" + name + b"\0")
               + store.delete_prefix(txn, seen, b"o\0" + name + b"\0")
               + store.delete_prefix(txn, seen, b"c\0" + name + b"\0"))
    if count is not None and txn.delete(b"A" + name, db=count):
        removed += 1
    return removed
