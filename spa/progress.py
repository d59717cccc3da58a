"""What a long ``spa prune`` is doing and for how long.

On a terminal one status line is redrawn a few times a second (stage, time in it, total, and
where a stage counts its work: percent done and ETA), so a stage that takes minutes visibly
moves. Elsewhere (a CI log, a pipe) each finished stage gets a line with its time, and a stage
still running gets a line with its percent and ETA every ``EVERY_S`` seconds. A run that ends
within ``QUIET_S`` prints none of those lines: a quick run's stderr stays empty, or holds just
the one error line the CLI promises for bad input.

Library loops count their work without knowing who listens::

    with progress.steps(len(groups), "groups") as step:
        for g in groups:
            ...
            step()

or ``for g in progress.track(groups, unit="groups")``; either is a no-op unless a ``StageProgress`` is active (``with StageProgress() as p``), so
``spa.prune``'s signature stays as it is. Only the outermost counted loop reports: a loop
counted inside another (statistics collected once per group) leaves the outer count alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from typing import Callable, Iterable, Iterator

__all__ = ["StageProgress", "QUIET_S", "EVERY_S", "phase", "steps", "track"]

# Stage lines of a non-terminal run are held back until the run has lasted this long.
QUIET_S = 2.0
# A non-terminal run writes a line at least this often while a stage runs.
EVERY_S = 10.0

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("spa_progress", default=None)


@contextlib.contextmanager
def steps(total: float, unit: str = "") -> Iterator[Callable[..., None]]:
    """Count ``total`` units of work in the current stage: ``step()`` after each one (or
    ``step(done=x)`` to say how far it is). Nothing is shown without an active StageProgress."""
    sink = _ACTIVE.get()
    if sink is None or sink.counting or total <= 0:
        yield lambda done=None: None
        return
    count = [0.0]

    def step(done: float | None = None):
        count[0] = count[0] + 1 if done is None else done
        sink.step(min(count[0], total), total, unit)

    sink.counting = True
    sink.step(0, total, unit)
    try:
        yield step
    finally:
        sink.counting = False
        sink.step(None, None, "")


@contextlib.contextmanager
def phase(text: str) -> Iterator[None]:
    """Name what the current stage is doing now (shown after the stage's name), so that a
    count that starts over (the same groups for each way of using the data) says why."""
    sink = _ACTIVE.get()
    old = sink.phase if sink is not None else None
    if sink is not None:
        sink.phase = text
    try:
        yield
    finally:
        if sink is not None:
            sink.phase = old


def track(items: Iterable, total: int | None = None, unit: str = "") -> Iterator:
    """``items``, each counted as done (``steps``) when the loop asks for the next one."""
    with steps(len(items) if total is None else total, unit) as step:
        for item in items:
            yield item
            step()


class StageProgress:
    """``with StageProgress() as p: ... p.stage("analyze") ...``"""

    def __init__(self, stream=None, enabled: bool = True, quiet_s: float | None = None, prefix: str = "spa",
                 every_s: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.stream = stream or sys.stderr
        self.enabled, self.prefix, self.clock = enabled, prefix, clock
        self.quiet_s = QUIET_S if quiet_s is None else quiet_s
        self.every_s = EVERY_S if every_s is None else every_s
        self.live = enabled and self.stream.isatty()
        self.start = self.stage_start = self.last_line = clock()
        self.name: str | None = None
        self.held: list[str] = []
        self.counting = False                   # a steps() loop is reporting
        self.phase: str | None = None
        self.done = self.total = None
        self.unit, self.count_start = "", self.start
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._thread = None
        self._token = None

    def __enter__(self) -> "StageProgress":
        self._token = _ACTIVE.set(self)
        if self.enabled:
            self._thread = threading.Thread(target=self._background, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            with self._lock:
                self._finish_stage()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.live:
            self._write("\r\033[K")
        _ACTIVE.reset(self._token)
        return False

    def stage(self, name: str):
        """A new stage begins; the one before it is finished."""
        with self._lock:
            self._finish_stage()
            self.name, self.stage_start = name, self.clock()
            self.done = self.total = None

    __call__ = stage   # usable directly as spa.prune's on_stage

    def step(self, done: float | None, total: float | None, unit: str = ""):
        """``done`` of ``total`` units of the current stage's work (None: not counted now)."""
        with self._lock:
            if total != self.total or unit != self.unit or done is None or (self.done or 0) > done:
                self.count_start = self.clock()   # a new count: its own rate for the ETA
            self.done, self.total, self.unit = done, total, unit

    def poll(self):
        """A non-terminal run's periodic line, when one is due (the background thread calls it)."""
        with self._lock:
            now = self.clock()
            if self.name is None or self.live or now - self.last_line < self.every_s:
                return
            self._write("".join(self.held) + f"{self.prefix}: {self._what()} {now - self.stage_start:.0f}s so far"
                        f"{self._counted(now)} (total {now - self.start:.0f}s)\n")
            self.held, self.last_line = [], now

    def _what(self) -> str:
        return f"{self.name} ({self.phase})" if self.phase else self.name

    def _counted(self, now: float) -> str:
        if self.done is None or not self.total:
            return ""
        text = f", {self.done / self.total:.0%}"
        if self.unit:
            text += f" ({self.done:.0f}/{self.total:.0f} {self.unit})"
        if self.done > 0:
            text += f", ETA {_duration((now - self.count_start) * (self.total - self.done) / self.done)}"
        return text

    def _finish_stage(self):
        if self.name is None or not self.enabled or self.live:
            return
        now = self.clock()
        self.held.append(f"{self.prefix}: {self.name} {now - self.stage_start:.2f}s "
                         f"(total {now - self.start:.1f}s)\n")
        if now - self.start >= self.quiet_s:
            self._write("".join(self.held))
            self.held, self.last_line = [], now

    def _background(self):
        while not self._stop.wait(0.2 if self.live else 1.0):
            if not self.live:
                self.poll()
                continue
            with self._lock:
                if self.name is None:
                    continue
                now = self.clock()
                self._write(f"\r\033[K{self.prefix}: {self._what()} {now - self.stage_start:.1f}s"
                            f"{self._counted(now)} (total {now - self.start:.1f}s)")

    def _write(self, text: str):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # a closed or broken stderr must not fail the run
            pass


def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"
