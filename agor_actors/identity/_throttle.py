"""Password guessing has an end: at most ``max_failures`` failed sign-ins per
name within ``window_ms``; beyond, the name's sign-ins are refused
(``rate_limited``) until its oldest failure leaves the window.  Names that
exist and names that do not are counted alike (the answer tells nothing).
Pure; bounded: at most ``names_max`` names are tracked (the least recently
failed are forgotten first)."""

from __future__ import annotations

from collections import OrderedDict, deque

import attrs

__all__ = ["SignInThrottle"]


@attrs.define
class SignInThrottle:
    max_failures: int = 10
    window_ms: int = 10 * 60 * 1000
    names_max: int = 10_000
    _failures: OrderedDict[str, deque[int]] = attrs.field(factory=OrderedDict, init=False)

    def retry_after_ms(self, name: str, now_ms: int) -> int:
        """0 if ``name`` may try now, else how long until it may."""
        failures = self._failures.get(name)
        if failures is None:
            return 0
        while failures and failures[0] <= now_ms - self.window_ms:
            failures.popleft()
        if not failures:
            del self._failures[name]
            return 0
        if len(failures) < self.max_failures:
            return 0
        return failures[0] + self.window_ms - now_ms

    def failed(self, name: str, now_ms: int) -> None:
        failures = self._failures.pop(name, None) or deque()
        failures.append(now_ms)
        while len(failures) > self.max_failures:
            failures.popleft()
        self._failures[name] = failures  # the most recent last
        while len(self._failures) > self.names_max:
            self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)
