"""Adapter for textarena's offline single-player games (optional: ``pip install boost[envs]``).

Supported games and their experts (computed here, textarena ships none):

- ``GuessTheNumber``: binary search over the numbers consistent with the hints.
- ``TowerOfHanoi``: the recursive solution, optimal from any legal position.
- ``Mastermind``: guess the first code consistent with all feedback so far.
- ``Minesweeper``: an oracle that reads the mine layout and reveals safe cells (logic alone cannot
  always avoid a guess, so no non-oracle expert wins every board).
- ``FrozenLake``: breadth-first search around the holes (the grid is visible to the player).

Rules are textarena's: an invalid reply gets one warning, a second invalid reply in a row ends the
game; the final reward is textarena's (1 for a win, a completion fraction otherwise). We play the
``-raw`` registrations (no observation wrappers): the game's prompt becomes ``instructions`` and each
observation holds only the messages new since the last reply.

textarena draws its randomness from Python's global ``random`` module (seeded on reset and used again
during play, e.g. Minesweeper places its mines on the first reveal). Each adapter keeps that state
privately and swaps it in around every call, so episodes are deterministic in their seed however
many run side by side, and the caller's global ``random`` state is left untouched.

Compact view (``textarena:FrozenLake-v0-compact``, :data:`COMPACT_GAMES`): the same game, rules and
rewards, with short instructions and one short observation per turn built from the game's state
(one token per cell under a whitespace tokenizer, as the built-in games' compact views), for small
models::

    moved ; P . . . / . . . . / . H H . / . . H G ; P 0 0 G 3 3

(the last reply's outcome: ``start``, ``moved``, ``invalid``, then ``won``, ``lost``, ``invalid twice``
or ``out of moves``; the rows separated by ``/``; the player's and the goal's row and column).

Splits: a task's key is its secret content where it has one (the number, the code, the lake), so
splits never share an instance. Tower of Hanoi has a single instance, and a Minesweeper board is only
drawn on the first reveal, so for those two the key is the seed (``content_disjoint_splits`` False).
"""

from __future__ import annotations

import itertools
import random
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from boost.envs.base import COMPACT_SUFFIX, Env, EnvError, Step, Task

# Registered names (without the "textarena:" prefix) and, for each, its shifted variant.
GAMES = {
    "GuessTheNumber-v0": "GuessTheNumber-v0-hardcore",
    "GuessTheNumber-v0-hardcore": "GuessTheNumber-v0",
    "TowerOfHanoi-v0": "TowerOfHanoi-v0-medium",
    "TowerOfHanoi-v0-medium": "TowerOfHanoi-v0",
    "Mastermind-v0": "Mastermind-v0-hard",
    "Mastermind-v0-hard": "Mastermind-v0",
    "Minesweeper-v0-small": "Minesweeper-v0",
    "Minesweeper-v0": "Minesweeper-v0-small",
    "FrozenLake-v0": "FrozenLake-v0-hardcore",
    "FrozenLake-v0-hardcore": "FrozenLake-v0",
}
PREFIX = "textarena:"
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")


def import_textarena() -> Any:
    try:
        import textarena
    except ImportError as err:
        raise EnvError(
            "textarena environments need the optional 'textarena' package: pip install 'boost[envs]'"
        ) from err
    return textarena


# ---- experts, random actions and content keys, one set per game family --------------------------


def _guess_expert(game: Any) -> str:
    lo, hi = game.min_number, game.max_number
    for guess, hint in game.state.game_state["guess_history"]:
        if hint == "higher":
            lo = max(lo, guess + 1)
        else:
            hi = min(hi, guess - 1)
    return f"[{(lo + hi) // 2}]"


def _guess_random(game: Any, rng: random.Random) -> str:
    return f"[{rng.randint(game.min_number, game.max_number)}]"


def _guess_key(game: Any) -> str:
    return f"{game.min_number}-{game.max_number}:{game.game_number}"


def hanoi_moves(towers: dict[str, list[int]], target: str = "C") -> list[tuple[str, str]]:
    """Shortest move list putting every disk on ``target`` from a legal position."""
    peg_of = {disk: peg for peg, disks in towers.items() for disk in disks}
    moves: list[tuple[str, str]] = []

    def place(disk: int, peg: str) -> None:  # put disks disk..1 on peg, in order
        if disk == 0:
            return
        source = peg_of[disk]
        if source == peg:
            place(disk - 1, peg)
            return
        spare = ({"A", "B", "C"} - {source, peg}).pop()
        place(disk - 1, spare)
        moves.append((source, peg))
        peg_of[disk] = peg
        place(disk - 1, peg)

    place(len(peg_of), target)
    return moves


def _hanoi_expert(game: Any) -> str:
    source, target = hanoi_moves(game.state.game_state["towers"])[0]
    return f"[{source} {target}]"


def _hanoi_random(game: Any, rng: random.Random) -> str:
    source, target = rng.sample(["A", "B", "C"], 2)
    return f"[{source} {target}]"


def mastermind_feedback(secret: tuple[int, ...], guess: tuple[int, ...]) -> tuple[int, int]:
    """(black, white) pegs, counted as textarena counts them."""
    black = sum(s == g for s, g in zip(secret, guess))
    common = sum(min(secret.count(d), guess.count(d)) for d in set(guess))
    return black, common - black


_MASTERMIND_MAX_CODES = 20_000


def _mastermind_codes(game: Any) -> Iterator[tuple[int, ...]]:
    digits = range(1, game.num_numbers + 1)
    if game.duplicate_numbers:
        return itertools.product(digits, repeat=game.code_length)
    return itertools.permutations(digits, game.code_length)


def _mastermind_expert(game: Any) -> str:
    history = [(tuple(h["guess"]), (h["black"], h["white"])) for h in game.state.game_state["history"]]
    for code in _mastermind_codes(game):
        if all(mastermind_feedback(code, guess) == pegs for guess, pegs in history):
            return "[" + " ".join(map(str, code)) + "]"
    raise EnvError("Mastermind feedback is inconsistent with every code; the game state is corrupt")


def _mastermind_random(game: Any, rng: random.Random) -> str:
    digits = list(range(1, game.num_numbers + 1))
    if game.duplicate_numbers:
        code = [rng.choice(digits) for _ in range(game.code_length)]
    else:
        code = rng.sample(digits, game.code_length)
    return "[" + " ".join(map(str, code)) + "]"


def _mastermind_key(game: Any) -> str:
    return " ".join(map(str, game.state.game_state["secret_code"]))


def _minesweeper_expert(game: Any) -> str:
    if game.first_move:
        return f"[{game.rows // 2} {game.cols // 2}]"
    hidden_safe = [
        (r, c)
        for r in range(game.rows)
        for c in range(game.cols)
        if not game.revealed[r][c] and game.grid[r][c] != -1
    ]
    # Zeros first: each one flood-fills its neighbourhood.
    r, c = min(hidden_safe, key=lambda cell: (game.grid[cell[0]][cell[1]] != 0, cell))
    return f"[{r} {c}]"


def _minesweeper_random(game: Any, rng: random.Random) -> str:
    return f"[{rng.randrange(game.rows)} {rng.randrange(game.cols)}]"


_LAKE_MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def _frozenlake_expert(game: Any) -> str:
    state = game.state.game_state
    grid, start, goal = state["grid"], tuple(state["player_pos"]), tuple(state["goal_pos"])
    size = len(grid)
    first_move: dict[tuple[int, int], str] = {start: ""}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            return f"[{first_move[cell]}]"
        for move, (dr, dc) in _LAKE_MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < size and 0 <= nxt[1] < size and grid[nxt[0]][nxt[1]] != "H":
                if nxt not in first_move:
                    first_move[nxt] = first_move[cell] or move
                    queue.append(nxt)
    raise EnvError("FrozenLake goal is unreachable from the current position")


def _frozenlake_random(game: Any, rng: random.Random) -> str:
    return f"[{rng.choice(sorted(_LAKE_MOVES))}]"


def _frozenlake_key(game: Any) -> str:
    state = game.state.game_state
    return f"{state['player_pos']}|" + "|".join("".join(row) for row in state["grid"])


def _frozenlake_compact_instructions(game: Any) -> str:
    size = len(game.state.game_state["grid"])
    return (
        f"Lake {size}x{size} . P you , G goal , H hole . Reply [up] , [down] , [left] or [right] . "
        "Two invalid replies in a row end the game ."
    )


def _frozenlake_compact_board(game: Any) -> str:
    state = game.state.game_state
    (pr, pc), (gr, gc) = state["player_pos"], state["goal_pos"]
    rows = [
        " ".join("P" if (r, c) == (pr, pc) else (cell.strip() or ".") for c, cell in enumerate(row))
        for r, row in enumerate(state["grid"])
    ]
    return f"{' / '.join(rows)} ; P {pr} {pc} G {gr} {gc}"


# Games with a compact view: family -> (instructions, observation of the current state).
_COMPACT_VIEWS = {"FrozenLake": (_frozenlake_compact_instructions, _frozenlake_compact_board)}
COMPACT_GAMES = tuple(game for game in GAMES if game.split("-")[0] in _COMPACT_VIEWS)


def _compact_outcome(done: bool, info: dict[str, Any]) -> str:
    """One or two words for what the last reply did (see the module docstring)."""
    invalid = info["invalid"]
    if not done:
        return "invalid" if invalid else "moved"
    if info["success"]:
        return "won"
    if info["truncated"]:
        return "out of moves"
    return "invalid twice" if invalid else "lost"


_FAMILIES = {
    "GuessTheNumber": (_guess_expert, _guess_random, _guess_key),
    "TowerOfHanoi": (_hanoi_expert, _hanoi_random, None),
    "Mastermind": (_mastermind_expert, _mastermind_random, _mastermind_key),
    "Minesweeper": (_minesweeper_expert, _minesweeper_random, None),
    "FrozenLake": (_frozenlake_expert, _frozenlake_random, _frozenlake_key),
}


class TextArenaEnv(Env):
    """One textarena game as an :class:`~boost.envs.base.Env`; ``name`` is ``"textarena:<game id>"``,
    with ``-compact`` appended for the compact view (``compact=True``, games of :data:`COMPACT_GAMES`)."""

    def __init__(self, game_id: str, compact: bool = False) -> None:
        if game_id not in GAMES:
            raise EnvError(f"unsupported textarena game {game_id!r}; supported: {', '.join(GAMES)}")
        family = game_id.split("-")[0]
        if compact and family not in _COMPACT_VIEWS:
            raise EnvError(
                f"textarena game {game_id!r} has no compact view; games with one: {', '.join(COMPACT_GAMES)}"
            )
        self._ta = import_textarena()
        self.name = PREFIX + game_id + (COMPACT_SUFFIX if compact else "")
        self.game_id = game_id
        self._expert, self._random, self._key = _FAMILIES[family]
        self._view = _COMPACT_VIEWS[family] if compact else None
        self.content_disjoint_splits = self._key is not None
        self._game: Any = None
        self._random_state: Any = None
        self._probe = self._ta.make(f"{game_id}-raw")
        if self._probe.__class__.__name__ == "MastermindEnv":
            n_codes = sum(
                1 for _ in itertools.islice(_mastermind_codes(self._probe), _MASTERMIND_MAX_CODES + 1)
            )
            if n_codes > _MASTERMIND_MAX_CODES:
                raise EnvError(
                    f"{game_id}: the expert would enumerate more than {_MASTERMIND_MAX_CODES} codes"
                )
        with self._private_random():
            self._probe.reset(num_players=1, seed=0)
        # textarena counts valid moves only and allows one invalid reply between two valid ones.
        self.max_turns = 2 * self._probe.state.max_turns + 1
        self._random_state = None

    @contextmanager
    def _private_random(self) -> Iterator[None]:
        outer = random.getstate()
        if self._random_state is not None:
            random.setstate(self._random_state)
        try:
            yield
        finally:
            self._random_state = random.getstate()
            random.setstate(outer)

    def task_key(self, seed: int) -> str:
        if self._key is None:
            return f"{self.name}|seed:{seed}"
        saved = self._random_state
        self._random_state = None
        try:
            with self._private_random():
                self._probe.reset(num_players=1, seed=seed)
        finally:
            self._random_state = saved
        return f"{self.name}|{self._key(self._probe)}"

    @property
    def instructions(self) -> str:
        if self._game is None:
            raise EnvError("instructions are known after reset(task)")
        return self._instructions

    def _new_messages(self) -> list[tuple[Any, str]]:
        _, messages = self._game.get_observation()
        return [(kind, text) for _, text, kind in messages if kind != self._ta.ObservationType.PLAYER_ACTION]

    def reset(self, task: Task) -> str:
        self._check_task(task)
        self._game = self._ta.make(f"{self.game_id}-raw")
        self._random_state = None
        with self._private_random():
            self._game.reset(num_players=1, seed=task.seed)
        messages = self._new_messages()
        prompt = [text for kind, text in messages if kind == self._ta.ObservationType.PROMPT]
        self._instructions = "\n".join(prompt).strip()
        self._done = False
        self._turns = 0
        if self._view is not None:
            self._instructions = self._view[0](self._game)
            return f"start ; {self._view[1](self._game)}"
        observation = "\n".join(text for kind, text in messages if kind != self._ta.ObservationType.PROMPT)
        return observation.strip() or "The game has started. Make your first move."

    def step(self, action: str) -> Step:
        if self._game is None or self._done:
            raise EnvError("step() called before reset() or after the episode ended; call reset(task)")
        self._turns += 1
        with self._private_random():
            done, _ = self._game.step(action)
        messages = self._new_messages()
        admin = self._ta.ObservationType.GAME_ADMIN
        invalid = any(kind == admin and "invalid move" in text.lower() for kind, text in messages)
        observation = "\n".join(text for _, text in messages).strip()
        info: dict[str, Any] = {"invalid": invalid, "turn": self._turns}
        if not done and self._turns >= self.max_turns:  # cannot happen under textarena's own rules
            raise EnvError(f"{self.name}: game still running after {self._turns} replies")
        reward = 0.0
        if done:
            self._done = True
            rewards, game_info = self._game.close()
            reward = float(rewards[0])
            reason = str(game_info[0].get("reason", ""))
            info["invalid"] = invalid or bool(game_info[0].get("invalid_move"))
            info.update(success=reward >= 1.0, truncated="turn limit" in reason.lower(), reason=reason)
            observation = f"{observation}\nGame over: {reason}".strip()
        if self._view is not None:
            outcome = _compact_outcome(done, info)
            observation = f"{outcome} ; " + ("game over" if done else self._view[1](self._game))
        return Step(observation or "(no message)", reward, done, info)

    def action_span(self, reply: str) -> tuple[int, int] | None:
        """The inside of the first ``[...]``: every supported game reads its move from a bracketed
        group (``[42]``, ``[A C]``, ``[1 2 3 4]``, ``[3 5]``, ``[up]``); None without one."""
        match = _BRACKETED.search(reply)
        return match.span(1) if match else None

    def expert_action(self) -> str:
        return self._expert(self._game)

    def random_action(self, rng: random.Random) -> str:
        return self._random(self._game, rng)
