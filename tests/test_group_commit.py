"""The group committer (mta.queue.commit) on a real LMDB spool: one transaction for
what one turn of the loop queued, lazy operations (delivery outcomes) riding along with
the next commit or, alone, committed within their delay, order kept, flush at stop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest

from mta.queue.commit import Deadlines, GroupCommitter
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


DEADLOCK_PROBE = """
import sys, threading
from mta.queue.spool import Spool
from mta.http.api import load_throttle_rows
spool = Spool(sys.argv[1], 256 * 1024**2)
inside = threading.Event()

def writer():  # a long write transaction running Python, as the spool writer's ops do
    with spool.env.begin(write=True) as txn:
        inside.set()
        for i in range(200_000):
            txn.put(b"k%d" % i, b"v", db=spool.dbs["meta"])

thread = threading.Thread(target=writer)
thread.start()
inside.wait()
spool.open_db("added_at_run_time")  # first use of a database, from another thread
load_throttle_rows(spool)  # what /metrics and the dashboard read, from a thread
thread.join()
print("done")
"""


def test_opening_a_database_while_the_writer_works_does_not_deadlock(tmp_path: Path) -> None:
    # A bare lmdb env.open_db takes the write lock holding the GIL; the writer, holding
    # the lock, then waits for the GIL forever. The probe runs in a process of its own:
    # with that bug it hangs and the timeout says so.
    import subprocess
    import sys

    from bench.engine_proc import PROJECT_ROOT

    done = subprocess.run([sys.executable, "-c", DEADLOCK_PROBE, str(tmp_path / "spool")],
                          capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr


HOLD_WRITE_LOCK = """
import sys, lmdb
env = lmdb.open(sys.argv[1], map_size=int(sys.argv[2]), max_dbs=64)
txn = env.begin(write=True)
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
txn.abort()
"""


def test_what_queues_while_another_worker_commits_joins_the_next_commit(
        tmp_path: Path) -> None:
    """Another process (a worker) holds the spool's write lock: the writer takes its
    batch only once it has the lock, so everything queued meanwhile, over several turns
    of the loop, goes in one commit."""
    import subprocess
    import sys

    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(spool.path),
                               str(64 * 1024**2)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"

    async def run() -> tuple[list[bytes], int]:
        committer = await started(spool)
        pending = []
        for i in range(5):  # five turns of the loop, the writer awake after the first
            pending.append(committer.enqueue(put(b"w%d" % i)))
            await asyncio.sleep(0.02)
        assert not any(future.done() for future in pending)
        assert holder.stdin is not None
        holder.stdin.close()  # the other worker's transaction ends
        results = await asyncio.gather(*pending)
        commits = committer.commits
        await committer.close()
        return results, commits

    try:
        results, commits = asyncio.run(run())
    finally:
        holder.kill()
        holder.wait()
    assert results == [b"w%d" % i for i in range(5)]
    assert commits == 1
    spool.close()


def test_deadlines_end_late_waits_on_one_timer() -> None:
    # A wait past its timeout ends with TimeoutError, a shorter timeout asked later ends
    # first, and a future done in time is never touched.
    async def run() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines()
        long, done_in_time, short = (loop.create_future() for _ in range(3))
        deadlines.watch(long, 60.0)
        deadlines.watch(done_in_time, 0.01)
        deadlines.watch(short, 0.02)
        done_in_time.set_result("kept")
        with pytest.raises(TimeoutError):
            await short
        assert done_in_time.result() == "kept" and not long.done()
        long.set_result("late is fine")

    asyncio.run(run())


def test_a_commit_wait_past_its_timeout_ends_but_the_write_still_commits(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    gate = threading.Event()

    def slow(txn: Any) -> bytes:
        gate.wait(10)  # the writer is stuck until the wait has ended
        txn.put(b"late", b"v")
        return b"late"

    async def run() -> None:
        committer = await started(spool)
        with pytest.raises(TimeoutError):
            await committer.submit(slow, timeout=0.05)
        gate.set()
        await committer.flush()
        await committer.close()

    asyncio.run(run())
    with spool.read() as txn:
        assert txn.get(b"late") == b"v"
    spool.close()
