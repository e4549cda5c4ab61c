"""Online model of iteration time: t ~ a + b * tokens + c * context_tokens, learned from steps.

The core never reads a clock, but it sees how long each step took (update's `now` minus
schedule's `now`). Fitting those times to the batch shape lets a policy ask "how long would a
step with this many tokens and this much KV take?" on whatever hardware it runs, without a
profile: the simulator's cost model and a real GPU are both just sources of observations.

Least squares with exponential forgetting over three features, solved from running sums of
the normal equations (3x3), so an update and a prediction are a few dozen float operations.
"""

from __future__ import annotations


class IterTimeModel:
    def __init__(self, forget: float = 0.995, min_samples: int = 32) -> None:
        self.forget = forget  # weight of past observations per step: ~1/(1-forget) steps kept
        self.min_samples = min_samples
        self.samples = 0
        self._xx = [[0.0] * 3 for _ in range(3)]
        self._xy = [0.0] * 3
        self.coef: tuple[float, float, float] | None = None  # (a, b, c) once fitted

    @property
    def ready(self) -> bool:
        return self.coef is not None

    def observe(self, tokens: int, context_tokens: int, seconds: float) -> None:
        x = (1.0, float(tokens), context_tokens / 1000.0)  # scaled: keeps the system conditioned
        f = self.forget
        for i in range(3):
            row = self._xx[i]
            for j in range(3):
                row[j] = f * row[j] + x[i] * x[j]
            self._xy[i] = f * self._xy[i] + x[i] * seconds
        self.samples += 1
        if self.samples >= self.min_samples and self.samples % 8 == 0:
            self._solve()

    def _solve(self) -> None:
        # Ridge keeps the fit defined when a feature barely varies (e.g. all steps full).
        a = [row[:] + [y] for row, y in zip(self._xx, self._xy, strict=True)]
        for i in range(3):
            a[i][i] += 1e-9 * (1.0 + a[i][i])
        for col in range(3):
            piv = max(range(col, 3), key=lambda r: abs(a[r][col]))
            if abs(a[piv][col]) < 1e-18:
                return
            a[col], a[piv] = a[piv], a[col]
            for r in range(3):
                if r != col:
                    k = a[r][col] / a[col][col]
                    for c in range(col, 4):
                        a[r][c] -= k * a[col][c]
        coef = [a[i][3] / a[i][i] for i in range(3)]
        # A negative slope is noise (more work never makes a step faster): clamp it.
        self.coef = (coef[0], max(coef[1], 0.0), max(coef[2], 0.0) / 1000.0)

    def predict(self, tokens: int, context_tokens: int) -> float:
        a, b, c = self.coef or (0.0, 0.0, 0.0)
        return a + b * tokens + c * context_tokens

    def max_tokens(self, context_tokens: int, seconds: float) -> int:
        """Most tokens a step over this context can hold within `seconds` (may be <= 0)."""
        a, b, c = self.coef or (0.0, 0.0, 0.0)
        if b <= 0.0:
            return 1 << 30
        return int((seconds - a - c * context_tokens) / b)
