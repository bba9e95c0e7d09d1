"""Errors a user can act on: one line that names the bad input, what is allowed and the likely intent.

:class:`UserError` marks a problem in what the user gave (a file, a key of it, a name, an option value),
as opposed to a fault of the code. The command line prints its message as one line and exits with
status 2; any other exception is an internal error (status 1). Library errors that users meet stay
``ValueError`` / ``TypeError`` / ``KeyError`` subclasses, so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import contextlib
import difflib
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any


class UserError(ValueError):
    """A bad input the user can fix; the message is one line naming it, the allowed values and a close match."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a Slurm pre-emption or time limit, a container stop) seen as an interruption: every
    ``except KeyboardInterrupt`` that records a run ``interrupted``, stops a sweep and releases its locks
    handles it too, so a terminated run is recorded and resumed instead of leaving a lock to go stale."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active (in the main thread; elsewhere it does nothing), SIGTERM raises :class:`Terminated` in
    the main thread; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def suggest(value: Any, allowed: Iterable[Any]) -> str:
    """``" did you mean 'x'?"`` for the allowed value closest to ``value`` (difflib), else ``""``."""
    by_lower: dict[str, str] = {}
    for a in map(str, allowed):
        by_lower.setdefault(a.lower(), a)
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)  # case does not count
    return f" did you mean {by_lower[close[0]]!r}?" if close else ""


def unknown(kind: str, value: Any, allowed: Iterable[Any]) -> str:
    """``"unknown pruner 'dpia'; did you mean 'dpai'? known pruners: dpai, npb, ..."`` (one line)."""
    allowed = [str(a) for a in allowed]
    hint = suggest(value, allowed)
    return f"unknown {kind} {short(value)};{hint} known {kind}s: {', '.join(allowed) or 'none'}"


def short(value: Any, limit: int = 60) -> str:
    """A short description of ``value`` for messages: a module or other large object by its type, never its
    whole ``repr`` (a network's repr is hundreds of lines)."""
    torch = sys.modules.get("torch")  # no module can exist unless torch was imported
    if torch is not None and isinstance(value, torch.nn.Module):
        return f"a {type(value).__name__} module"
    text = repr(value)
    if "\n" in text or len(text) > limit:
        return f"a {type(value).__name__}" + (f" ({text.splitlines()[0][:limit]}...)" if text else "")
    return text


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces collapsed: messages are printed as one line."""
    return " ".join(str(text).split())
