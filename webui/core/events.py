"""Progress and job-state value objects shared by the engine, the queue and the front ends.
Must not import torch or anything outside the standard library."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a running job is: sampling step within the current batch, and which batch."""

    step: int
    total_steps: int
    batch_index: int
    batch_count: int

    @property
    def fraction(self) -> float:
        """A1111's progress: finished batches plus the share of the current one."""
        if self.total_steps <= 0 or self.batch_count <= 0:
            return 0.0
        return (self.batch_index + self.step / self.total_steps) / self.batch_count


class JobControl:
    """Cooperative interrupt and skip flags, checked by the sampling loop at every step.

    Interrupt stops the whole job; skip abandons the current batch and goes on with the next.
    """

    def __init__(self) -> None:
        self._interrupted = threading.Event()
        self._skipped = threading.Event()

    def interrupt(self) -> None:
        self._interrupted.set()

    def skip(self) -> None:
        self._skipped.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    @property
    def skipped(self) -> bool:
        return self._skipped.is_set()

    def clear_skip(self) -> None:
        """Called when a new batch starts: a skip only ever applies to the batch it was made in."""
        self._skipped.clear()
