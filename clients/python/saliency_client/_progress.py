"""A one-line text progress bar for streamed Score progress (`saliency score`, `saliency evaluate`)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ._types import Progress

_WIDTH = 30


class ProgressBar:
    """Redraws `label [#####.....] stage done/total elapsed` in place; `close()` ends the line.

    Call it with each `Progress` (it is a `progress=` callback of `SaliencyClient.score`).
    """

    def __init__(self, label: str = "", out: TextIO | None = None) -> None:
        self.label = label
        self.out = out or sys.stderr
        self.started = time.perf_counter()
        self.drawn = False

    def __call__(self, progress: Progress) -> None:
        self.update(progress.stage, progress.done, progress.total)

    def update(self, stage: str, done: int, total: int) -> None:
        filled = _WIDTH if total <= 0 else min(_WIDTH, _WIDTH * done // total)
        bar = "#" * filled + "." * (_WIDTH - filled)
        elapsed = time.perf_counter() - self.started
        head = f"{self.label} " if self.label else ""
        self.out.write(f"\r{head}[{bar}] {stage} {done}/{total} {elapsed:.1f}s\x1b[K")
        self.out.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False
