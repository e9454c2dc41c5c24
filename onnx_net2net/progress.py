"""Progress on stderr for work that takes more than a couple of seconds.

Shown for models whose weights exceed `THRESHOLD_BYTES` (small models finish
before a display would help): one line per stage with its duration, and a
byte bar (tqdm) while the output is written.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

THRESHOLD_BYTES = 64 << 20


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    @classmethod
    def for_model(cls, weight_bytes: int) -> "Progress":
        return cls(weight_bytes >= THRESHOLD_BYTES)

    def include(self, weight_bytes: int) -> None:
        """Switch on once more is known (a small file with large external data)."""
        self.enabled = self.enabled or weight_bytes >= THRESHOLD_BYTES

    @contextmanager
    def stage(self, label: str):
        start = time.perf_counter()
        if self.enabled:
            print(f"{label}...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f"{label}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    @contextmanager
    def bytes_bar(self, label: str, total: int):
        """Yields a callback taking a byte count (a no-op when disabled)."""
        if not self.enabled:
            yield None
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar:
            yield bar.update
