"""Progress of long work: a tqdm bar on a terminal, plain log lines everywhere else.

``progress_bar`` returns something with tqdm's small interface (iterate, ``update``,
``set_postfix``, ``set_description``, ``close``, context manager). When stderr is a
terminal it is a tqdm bar. Otherwise (logs, CI, a pipe) it writes one line to the logger
``polyrec.progress`` at most every ``interval`` seconds (10 by default; 0 for a line per
update, e.g. one per epoch) and one when it ends, with the count, total, elapsed time,
ETA and the postfix (loss, validation metric). ``stage`` logs one line for a step
without a count ("fitting ease on validation data").

The library only logs: nothing appears unless the host configures logging. The
``polyrec`` command sends ``polyrec.progress`` to stderr unless ``--quiet``.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger("polyrec.progress")
#: Seconds between two lines of the same progress when output is not a terminal.
LINE_INTERVAL = 10.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LineProgress:
    """tqdm's interface, written as log lines (see the module docstring)."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", interval: float = LINE_INTERVAL,
                 logger: logging.Logger | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.interval = total, desc, unit.strip(), interval
        self.n, self.postfix = 0, ""
        self.log = logger or log
        self.started = self._last = time.monotonic()
        self._emitted_at: int | None = None
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress made without an iterable"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.interval <= 0 or now - self._last >= self.interval:
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw (tqdm's interface)."""

    def write(self, message: str) -> None:
        self.log.info("%s", message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._emitted_at != self.n:
            self._emit(time.monotonic())

    def line(self, now: float | None = None) -> str:
        """The current state as one line."""
        elapsed = (now or time.monotonic()) - self.started
        count = f"{self.n:,}" if self.total is None else f"{self.n:,}/{self.total:,}"
        parts = [f"{self.desc}: {count} {self.unit}".rstrip()]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        timing = f"{_duration(elapsed)} elapsed"
        if self.total and 0 < self.n < self.total:
            timing += f", ETA {_duration(elapsed / self.n * (self.total - self.n))}"
        parts.append(timing)
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _emit(self, now: float) -> None:
        self.log.info("%s", self.line(now))
        self._last, self._emitted_at = now, self.n


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", enabled: bool = True,
                 interval: float | None = None, leave: bool = True) -> Any:
    """A progress display for a loop: tqdm on a terminal, log lines elsewhere, nothing
    when ``enabled`` is false. ``interval``: seconds between lines off a terminal (0:
    a line per update; default :data:`LINE_INTERVAL`)."""
    if enabled and not is_terminal():
        return LineProgress(iterable, total=total, desc=desc, unit=unit,
                            interval=LINE_INTERVAL if interval is None else interval)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)


def stage(message: str, enabled: bool = True) -> None:
    """One line for a step of long work (above any bar on a terminal)."""
    if not enabled:
        return
    if is_terminal():
        tqdm.write(message, file=sys.stderr)
    else:
        log.info("%s", message)
