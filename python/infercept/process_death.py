"""Child processes that must not outlive their parent (the engine process, tensor-parallel
workers)."""

from __future__ import annotations

import contextlib
import signal
import sys


def die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
