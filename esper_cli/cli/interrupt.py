"""Ctrl-C in two phases: while a command starts up it exits at once; once it has work to keep, it
raises KeyboardInterrupt so the command can keep that work and exit 130.

Start-up is mostly importing torch, scikit-learn and SciPy. A KeyboardInterrupt in the middle of
an import can leave a half-initialised module behind (numpy's lazy submodules then recurse
forever), so the process cannot be trusted to unwind cleanly from there; and before a command
opens a store or starts training there is nothing to keep. The console script
(`esper_cli.__main__`) arms `exit_now`; a command calls `keep_work_on_interrupt()` just before
its first write.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


def exit_now(signum: int, frame: FrameType | None) -> None:
    """SIGINT handler for start-up: nothing has been written yet, so stop right here (exit 130)."""
    os.write(2, b"Interrupted.\n")
    os._exit(130)


def exit_on_interrupt() -> None:
    """Arm `exit_now` unless SIGINT is ignored (a background job) or handled by someone else."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, exit_now)


def keep_work_on_interrupt() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt, which the command turns into 'keep what is done'."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is exit_now:
        signal.signal(signal.SIGINT, signal.default_int_handler)
