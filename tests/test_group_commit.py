"""The group committer (mta.queue.commit) on a real LMDB spool: one transaction for
what one turn of the loop queued, lazy operations (delivery outcomes) riding along with
the next commit or, alone, committed within their delay, order kept, flush at stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import lmdb

from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool, SpoolFullError


def put(key: bytes, log: list[bytes] | None = None) -> Any:
    def op(txn: Any) -> bytes:
        txn.put(key, b"v")
        if log is not None:
            log.append(key)
        return key

    return op


async def started(spool: Spool, lazy_delay: float = 0.05) -> GroupCommitter:
    committer = GroupCommitter(spool, lazy_delay=lazy_delay)
    committer.start()
    return committer


def test_one_turn_of_the_loop_is_one_transaction(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    async def run() -> tuple[list[bytes], int]:
        committer = await started(spool)
        results = await asyncio.gather(*(committer.submit(put(b"k%d" % i)) for i in range(50)))
        commits = committer.commits
        await committer.close()
        return results, commits

    results, commits = asyncio.run(run())
    assert results == [b"k%d" % i for i in range(50)]
    assert commits == 1
    spool.close()


def test_lazy_operation_alone_waits_for_its_delay(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    async def run() -> tuple[float, int]:
        committer = await started(spool, lazy_delay=0.3)
        begun = time.monotonic()
        await committer.submit(put(b"late"), lazy=True)
        waited = time.monotonic() - begun
        commits = committer.commits
        await committer.close()
        return waited, commits

    waited, commits = asyncio.run(run())
    assert waited >= 0.25  # not committed on its own at once ...
    assert commits == 1  # ... but committed without anything else asking
    with spool.env.begin() as txn:
        assert txn.get(b"late") == b"v"
    spool.close()


def test_lazy_operations_join_the_next_commit_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    order: list[bytes] = []

    async def run() -> tuple[float, int]:
        committer = await started(spool, lazy_delay=30.0)
        lazy = [asyncio.ensure_future(committer.submit(put(b"o%d" % i, order), lazy=True))
                for i in range(3)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in lazy)  # nothing asked for a commit yet
        begun = time.monotonic()
        await committer.submit(put(b"intake", order))  # an urgent one: all go now
        waited = time.monotonic() - begun
        await asyncio.gather(*lazy)
        commits = committer.commits
        await committer.close()
        return waited, commits

    waited, commits = asyncio.run(run())
    assert waited < 10  # far below the lazy delay
    assert commits == 1
    assert order == [b"o0", b"o1", b"o2", b"intake"]
    spool.close()


def test_flush_commits_the_lazy_ones_now(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    async def run() -> bool:
        committer = await started(spool, lazy_delay=30.0)
        outcome = asyncio.ensure_future(committer.submit(put(b"outcome"), lazy=True))
        await asyncio.sleep(0)
        await committer.flush()
        done = outcome.done()
        await committer.close()
        return done

    assert asyncio.run(run())
    with spool.env.begin() as txn:
        assert txn.get(b"outcome") == b"v"
    spool.close()


def test_a_failing_operation_fails_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    def boom(txn: Any) -> None:
        raise ValueError("bad op")

    async def run() -> list[Any]:
        committer = await started(spool)
        results = await asyncio.gather(committer.submit(put(b"a")), committer.submit(boom),
                                       committer.submit(put(b"b")), return_exceptions=True)
        await committer.close()
        return results

    a, failed, b = asyncio.run(run())
    assert (a, b) == (b"a", b"b") and isinstance(failed, ValueError)
    spool.close()


def test_close_finishes_what_is_queued(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    async def run() -> None:
        committer = await started(spool, lazy_delay=30.0)
        committer.enqueue(put(b"queued"), lazy=True)
        await committer.close()

    asyncio.run(run())
    with spool.env.begin() as txn:
        assert txn.get(b"queued") == b"v"
    spool.close()


class _CommitFails:
    """An environment whose write transactions run their operations, then fail to
    commit as a full map does (MDB_MAP_FULL at mdb_txn_commit)."""

    def __init__(self, env: Any) -> None:
        self.env = env

    def begin(self, write: bool = False) -> Any:
        return _FailingTxn(self.env.begin(write=write))


class _FailingTxn:
    def __init__(self, txn: Any) -> None:
        self.txn = txn

    def __enter__(self) -> Any:
        return self.txn

    def __exit__(self, *exc: Any) -> None:
        self.txn.abort()
        if exc[0] is None:
            raise lmdb.MapFullError("mdb_txn_commit: MDB_MAP_FULL")


def test_a_failed_commit_gives_each_operation_one_result(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    real = spool.env
    spool.env = _CommitFails(real)
    try:
        results = spool.apply([put(b"a"), put(b"b"), put(b"c")])
    finally:
        spool.env = real
    assert len(results) == 3  # not the op's value and then the commit's failure
    assert all(isinstance(r, SpoolFullError) for r in results)
    spool.close()
