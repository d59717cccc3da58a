"""What a long ``spa prune`` is doing and for how long.

On a terminal one status line is redrawn a few times a second (stage, time in it, total),
so a stage that takes 35 s visibly counts up instead of sitting still. Elsewhere (a CI log, a
pipe) each finished stage gets a line with its time. A run that ends within ``QUIET_S``
prints none of those lines: a quick run's stderr stays empty, or holds just the one error
line the CLI promises for bad input.
"""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["StageProgress", "QUIET_S"]

# Stage lines of a non-terminal run are held back until the run has lasted this long.
QUIET_S = 2.0


class StageProgress:
    """``with StageProgress() as p: ... p.stage("analyze") ...``"""

    def __init__(self, stream=None, enabled: bool = True, quiet_s: float | None = None, prefix: str = "spa"):
        self.stream = stream or sys.stderr
        self.enabled, self.prefix = enabled, prefix
        self.quiet_s = QUIET_S if quiet_s is None else quiet_s
        self.live = enabled and self.stream.isatty()
        self.start = self.stage_start = time.perf_counter()
        self.name: str | None = None
        self.held: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    def __enter__(self) -> "StageProgress":
        if self.live:
            self._thread = threading.Thread(target=self._redraw, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self._finish_stage()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._write("\r\033[K")
        return False

    def stage(self, name: str):
        """A new stage begins; the one before it is finished."""
        with self._lock:
            self._finish_stage()
            self.name, self.stage_start = name, time.perf_counter()

    __call__ = stage   # usable directly as spa.prune's on_stage

    def _finish_stage(self):
        if self.name is None or not self.enabled or self.live:
            return
        now = time.perf_counter()
        self.held.append(f"{self.prefix}: {self.name} {now - self.stage_start:.2f}s "
                         f"(total {now - self.start:.1f}s)\n")
        if now - self.start >= self.quiet_s:
            self._write("".join(self.held))
            self.held = []

    def _redraw(self):
        while not self._stop.wait(0.2):
            with self._lock:
                if self.name is None:
                    continue
                now = time.perf_counter()
                self._write(f"\r\033[K{self.prefix}: {self.name} {now - self.stage_start:.1f}s "
                            f"(total {now - self.start:.1f}s)")

    def _write(self, text: str):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # a closed or broken stderr must not fail the run
            pass
