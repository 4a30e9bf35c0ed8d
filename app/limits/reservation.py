"""What one admitted request holds in the store (`Reservation`): its checks as admitted, to
settle when it ends, and the x-ratelimit-* headers they give the client."""

from __future__ import annotations

from dataclasses import dataclass

from app.limits.checks import Check, Verdict, format_duration


@dataclass(slots=True)
class Reservation:
    """What one request holds: its checks as admitted, to settle when it ends."""

    member: str
    checks: list[Check]
    verdict: Verdict | None  # None: admitted without the store (an outage, with an open policy)
    settled: bool = False
    tokens: int = 0  # what it was settled at
    owner: str = ""  # admission ahead: whose next request to reserve when this one ends ...
    ahead: list[Check] | None = None  # ... and with what amounts

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* of the tightest requests and tokens limits."""
        headers: dict[str, str] = {}
        if self.verdict is None:
            return headers
        states, checks = self.verdict.states, self.checks
        tightest = {"requests": -1, "tokens": -1}  # kind -> index of its check with the least left
        for i, check in enumerate(checks):
            best = tightest.get(check.kind)
            if best is not None and (best < 0 or states[i][0] < states[best][0]):
                tightest[check.kind] = i
        for kind, i in tightest.items():
            if i >= 0:
                remaining, reset_ms = states[i]
                headers[f"x-ratelimit-limit-{kind}"] = str(checks[i].limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(reset_ms)
        return headers

    @property
    def leases(self) -> list[tuple[Check, str]]:
        return [(c, self.member) for c in self.checks if c.kind in ("concurrency", "budget")]
