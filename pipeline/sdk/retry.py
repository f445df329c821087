"""Backoff between attempts: exponential with full jitter (AWS's "Exponential Backoff And Jitter")."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset after a run that lasted ``healthy_after``."""

    initial: float = 0.5
    maximum: float = 30.0
    healthy_after: float = 60.0
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)
