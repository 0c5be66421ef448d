"""Holding Ctrl-C and SIGTERM back while a piece of work that must not be left half done runs
(a training step's optimizer update: interrupted there, the model is neither the step before nor
the step after, so nothing consistent could be saved)."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM that arrive inside the block take effect when it ends (their handlers
    then run as they would have), so what the block does is never left half done. Outside the
    main thread (where handlers cannot be set), or under handlers not set from Python, the block
    runs as is."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    caught = []
    for s in previous:
        signal.signal(s, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signum, frame = caught[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)  # Python's SIGINT handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)
