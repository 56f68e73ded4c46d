"""Ctrl-C and SIGTERM in the bench commands: stop, tear down everything started, exit 130.

Both raise KeyboardInterrupt in the main thread (inside `uvloop.run`, asyncio's runner
turns the first Ctrl-C into a cancellation of the load instead), so the `finally`
blocks and context managers that own the rig's processes stop them; the teardown
itself runs with both signals ignored, so a second Ctrl-C cannot cut it short.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def stop_on_signals() -> None:
    """Make Ctrl-C (SIGINT) and SIGTERM interrupt this command.

    SIGINT gets Python's handler even when this process inherited it ignored: a shell
    without job control starts background commands (`cmd &` in a script, a test suite
    run in the background) with SIGINT ignored, and Python then leaves it ignored; a
    bench started that way would keep its rig and load running through every SIGINT."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _as_ctrl_c)


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    signal.raise_signal(signal.SIGINT)  # whichever SIGINT handler is current: one path


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Let a teardown finish even if Ctrl-C is pressed again meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
