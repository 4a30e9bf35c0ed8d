"""A circuit breaker per upstream model: after `threshold` consecutive failures it opens for a
growing, jittered time; while open, requests fail fast. After that time one trial request
goes through (half-open): success closes it, failure opens it again for longer."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    opens: int = 0
    open_until: float = 0.0
    trial: bool = False


class CircuitBreaker:
    def __init__(self, threshold: int, base_s: float, cap_s: float) -> None:
        self.threshold = threshold
        self.base_s = base_s
        self.cap_s = cap_s
        self._circuits: dict[str, _Circuit] = {}

    def allow(self, model: str) -> bool:
        circuit = self._circuits.get(model)
        if circuit is None or circuit.failures < self.threshold:
            return True
        if time.monotonic() < circuit.open_until or circuit.trial:
            return False
        circuit.trial = True  # half-open: one request finds out
        return True

    def retry_in_s(self, model: str) -> float:
        circuit = self._circuits.get(model)
        return max(0.0, circuit.open_until - time.monotonic()) if circuit else 0.0

    def success(self, model: str) -> None:
        self._circuits.pop(model, None)

    def failure(self, model: str) -> None:
        circuit = self._circuits.setdefault(model, _Circuit())
        circuit.failures += 1
        circuit.trial = False
        if circuit.failures >= self.threshold:
            circuit.opens += 1
            span = min(self.cap_s, self.base_s * 2 ** (circuit.opens - 1))
            circuit.open_until = time.monotonic() + span * random.uniform(0.8, 1.2)

    def is_open(self, model: str) -> bool:
        circuit = self._circuits.get(model)
        return circuit is not None and circuit.failures >= self.threshold
