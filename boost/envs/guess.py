"""Number guessing with higher/lower feedback.

Each task hides a whole number in a range ``[low, high]`` that the task states. The agent replies with
a guess and hears ``higher``, ``lower`` or that it is right. A reply that is not a whole number in the
range is invalid and wastes the turn. Guessing right ends the episode with reward
``expert turns / turns taken`` capped at 1 (1.0 for binary search, less for slower success);
running out of turns ends it with reward 0. The expert is binary search over the numbers still
consistent with the feedback, which needs at most ``ceil(log2(high - low + 2))`` guesses.

``GuessConfig(compact=True)`` words the feedback for small models (the CPU preset's default): each
observation states the outcome of the last guess and the range of numbers still consistent with all
the feedback so far, e.g. ``higher 35 ; range 36 60 ; left 6``. The range is what the feedback
implies, so the task is unchanged; the model is spared the bookkeeping over the chat history.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from boost.envs.base import Env, EnvError, Step, Task, stripped_span

_INTEGER = re.compile(r"[-+]?\d+")
_AROUND = ".!'\"`[]()"  # what a reply may wrap its number in


@dataclass(frozen=True)
class GuessConfig:
    """A distribution of guessing tasks: ranges of ``min_width`` to ``max_width`` numbers starting
    anywhere in ``[0, max_low]``. ``slack`` extra turns on top of what binary search needs."""

    min_width: int = 16
    max_width: int = 64
    max_low: int = 100
    slack: int = 2
    compact: bool = False  # short instructions; observations state the consistent range

    def __post_init__(self) -> None:
        if not 2 <= self.min_width <= self.max_width:
            raise EnvError(
                f"GuessConfig needs 2 <= min_width <= max_width, got {self.min_width} and {self.max_width}"
            )
        if self.max_low < 0:
            raise EnvError(f"GuessConfig.max_low must be >= 0, got {self.max_low}")
        if self.slack < 0:
            raise EnvError(f"GuessConfig.slack must be >= 0, got {self.slack}")

    @property
    def max_turns(self) -> int:
        return binary_search_budget(self.max_width) + self.slack


def binary_search_budget(width: int) -> int:
    """Guesses binary search needs in the worst case over ``width`` numbers."""
    return math.ceil(math.log2(width + 1))


def build_task(config: GuessConfig, seed: int) -> tuple[int, int, int]:
    """(low, high, secret) of task ``seed``."""
    rng = random.Random(seed)
    width = rng.randint(config.min_width, config.max_width)
    low = rng.randint(0, config.max_low)
    high = low + width - 1
    return low, high, rng.randint(low, high)


def parse_guess(action: str) -> int | None:
    """The reply as a whole number (surrounding spaces, brackets and a final period allowed), else None."""
    start, end = stripped_span(action, _AROUND)
    text = action[start:end]
    return int(text) if _INTEGER.fullmatch(text) else None


class GuessEnv(Env):
    """Find a hidden number from higher/lower feedback. See the module docstring for the rules."""

    def __init__(self, name: str = "guess", config: GuessConfig | None = None) -> None:
        self.name = name
        self.config = config or GuessConfig()
        self.max_turns = self.config.max_turns
        self._secret: int | None = None

    def task_key(self, seed: int) -> str:
        low, high, secret = build_task(self.config, seed)
        return f"{self.name}|{low}|{high}|{secret}"

    @property
    def instructions(self) -> str:
        if self.config.compact:
            return f"Guess the number in at most {self.max_turns} guesses . Reply with a number ."
        return (
            "I am thinking of a whole number. After each guess I say whether the number is higher or "
            f"lower than your guess. Find it in at most {self.max_turns} guesses. "
            "Reply with the number only, for example: 42"
        )

    def reset(self, task: Task) -> str:
        self._check_task(task)
        self._low, self._high, self._secret = build_task(self.config, task.seed)
        self._lo, self._hi = self._low, self._high  # numbers still consistent with the feedback
        self._expert_turns = self._binary_search_turns()
        self._turns = 0
        self._done = False
        if self.config.compact:
            return f"start ; range {self._low} {self._high} ; left {self.max_turns}"
        return f"The number is between {self._low} and {self._high} (inclusive). Your guess?"

    def _binary_search_turns(self) -> int:
        lo, hi, turns = self._low, self._high, 0
        while True:
            turns += 1
            mid = (lo + hi) // 2
            if mid == self._secret:
                return turns
            lo, hi = (mid + 1, hi) if mid < self._secret else (lo, mid - 1)

    def step(self, action: str) -> Step:
        if self._secret is None or self._done:
            raise EnvError("step() called before reset() or after the episode ended; call reset(task)")
        self._turns += 1
        guess = parse_guess(action)
        invalid = guess is None or not self._low <= guess <= self._high
        info = {"invalid": invalid, "turn": self._turns}
        compact = self.config.compact
        if invalid:
            message = "invalid" if compact else (
                f"Invalid guess {action.strip()[:40]!r}: reply with a whole number "
                f"between {self._low} and {self._high}."
            )  # fmt: skip
        elif guess == self._secret:
            self._done = True
            info.update(success=True, truncated=False)
            reward = min(1.0, self._expert_turns / self._turns)
            text = f"correct {guess}" if compact else (
                f"Correct! The number is {guess}. Solved in {self._turns} guesses."
            )  # fmt: skip
            return Step(text, reward, True, info)
        elif guess < self._secret:
            self._lo = max(self._lo, guess + 1)
            message = f"higher {guess}" if compact else f"Higher than {guess}."
        else:
            self._hi = min(self._hi, guess - 1)
            message = f"lower {guess}" if compact else f"Lower than {guess}."
        if self._turns >= self.max_turns:
            self._done = True
            info.update(success=False, truncated=True)
            text = f"{message} ; out of guesses" if compact else (
                f"{message} Out of guesses: the number was {self._secret}."
            )  # fmt: skip
            return Step(text, 0.0, True, info)
        if compact:
            return Step(
                f"{message} ; range {self._lo} {self._hi} ; left {self.max_turns - self._turns}",
                0.0,
                False,
                info,
            )
        return Step(f"{message} Guesses left: {self.max_turns - self._turns}.", 0.0, False, info)

    def action_span(self, reply: str) -> tuple[int, int] | None:
        """The number :func:`parse_guess` reads (None: the reply is no number)."""
        return stripped_span(reply, _AROUND) if parse_guess(reply) is not None else None

    def expert_action(self) -> str:
        return str((self._lo + self._hi) // 2)

    def random_action(self, rng: random.Random) -> str:
        return str(rng.randint(self._low, self._high))
