"""Grid navigation with text observations.

The agent sees a small grid with walls, its own position and the goal, and replies with one move
(``up``, ``down``, ``left``, ``right``). Moving into a wall or off the grid wastes the turn; a reply
that is not one of the four moves is invalid and also wastes the turn. Reaching the goal ends the
episode with reward ``shortest path length / turns taken`` (1.0 for optimal play); running out of
turns ends it with reward 0. The expert walks a shortest path (breadth-first search), from any state.

``GridNavConfig(compact=True)`` states the same information in fewer words, one token per grid cell
under a whitespace tokenizer (for small models; the CPU preset's default)::

    start ; # . A . . / . . . # . / ... ; A 0 2 G 3 4

(the last move's outcome, the rows separated by ``/``, the agent's and the goal's row and column).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from boost.envs.base import Env, EnvError, Step, Task, stripped_span

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
WALL, FLOOR, AGENT, GOAL = "#", ".", "A", "G"

Cell = tuple[int, int]


@dataclass(frozen=True)
class GridNavConfig:
    """A distribution of grid tasks: ``size`` x ``size`` cells, ``n_walls`` wall cells."""

    size: int = 5
    n_walls: int = 5
    min_distance: int = 3
    max_turns: int = 20
    compact: bool = False  # short instructions and observations (see the module docstring)

    def __post_init__(self) -> None:
        if self.size < 3:
            raise EnvError(f"GridNavConfig.size must be >= 3, got {self.size}")
        if not 0 <= self.n_walls <= self.size * self.size // 3:
            raise EnvError(
                f"GridNavConfig.n_walls must be in [0, size*size/3] = [0, {self.size * self.size // 3}], "
                f"got {self.n_walls}"
            )
        if not 1 <= self.min_distance <= self.size:
            raise EnvError(f"GridNavConfig.min_distance must be in [1, size], got {self.min_distance}")
        if self.max_turns < 2 * self.size:
            raise EnvError(
                f"GridNavConfig.max_turns must be >= 2*size = {2 * self.size}, got {self.max_turns}"
            )


@dataclass(frozen=True)
class Grid:
    size: int
    walls: frozenset[Cell]
    start: Cell
    goal: Cell

    def free(self, cell: Cell) -> bool:
        r, c = cell
        return 0 <= r < self.size and 0 <= c < self.size and cell not in self.walls

    def distances_to_goal(self) -> dict[Cell, int]:
        """Shortest number of moves from every reachable cell to the goal."""
        dist = {self.goal: 0}
        queue = deque([self.goal])
        while queue:
            r, c = queue.popleft()
            for dr, dc in MOVES.values():
                nxt = (r + dr, c + dc)
                if self.free(nxt) and nxt not in dist:
                    dist[nxt] = dist[(r, c)] + 1
                    queue.append(nxt)
        return dist

    def render(self, agent: Cell) -> str:
        rows = []
        for r in range(self.size):
            row = []
            for c in range(self.size):
                cell = (r, c)
                row.append(
                    AGENT
                    if cell == agent
                    else GOAL
                    if cell == self.goal
                    else WALL
                    if cell in self.walls
                    else FLOOR
                )
            rows.append("".join(row))
        return "\n".join(rows)


def build_grid(config: GridNavConfig, seed: int) -> Grid:
    """The grid of task ``seed``: walls, start and goal drawn until the goal is far enough and reachable."""
    rng = random.Random(seed)
    cells = [(r, c) for r in range(config.size) for c in range(config.size)]
    while True:
        picked = rng.sample(cells, config.n_walls + 2)
        grid = Grid(config.size, frozenset(picked[2:]), start=picked[0], goal=picked[1])
        distance = grid.distances_to_goal().get(grid.start)
        if distance is not None and distance >= config.min_distance:
            return grid


def parse_move(action: str) -> str | None:
    """The move named by a reply (first line, case and surrounding punctuation ignored), else None."""
    span = _move_span(action)
    word = action[span[0] : span[1]].lower()
    return word if word in MOVES else None


def _move_span(action: str) -> tuple[int, int]:
    """(start, end) in ``action`` of its first non-blank line without surrounding punctuation."""
    lead = len(action) - len(action.lstrip())
    first = (action[lead:].splitlines() or [""])[0]
    start, end = stripped_span(first, ".!'\"`[]()")
    return lead + start, lead + end


class GridNavEnv(Env):
    """Navigate an ``A`` to a ``G`` on a text grid. See the module docstring for the rules."""

    def __init__(self, name: str = "gridnav", config: GridNavConfig | None = None) -> None:
        self.name = name
        self.config = config or GridNavConfig()
        self.max_turns = self.config.max_turns
        self._grid: Grid | None = None

    def task_key(self, seed: int) -> str:
        grid = build_grid(self.config, seed)
        return f"{self.name}|{grid.render(grid.start)}"

    @property
    def instructions(self) -> str:
        if self.config.compact:
            return (
                f"Grid {self.config.size}x{self.config.size} . {AGENT} you , {GOAL} goal , {WALL} wall . "
                f"At most {self.max_turns} moves . Reply up , down , left or right ."
            )
        return (
            f"You move an agent on a {self.config.size}x{self.config.size} grid. "
            f"'{AGENT}' is you, '{GOAL}' is the goal, '{WALL}' is a wall, '{FLOOR}' is free floor. "
            "Rows are numbered from 0 at the top, columns from 0 at the left. "
            f"Reach the goal in at most {self.max_turns} moves. "
            "Reply with exactly one word: up, down, left or right."
        )

    def reset(self, task: Task) -> str:
        self._check_task(task)
        self._grid = build_grid(self.config, task.seed)
        self._agent = self._grid.start
        self._distances = self._grid.distances_to_goal()
        self._optimal = self._distances[self._grid.start]
        self._turns = 0
        self._done = False
        return self._describe("Find the goal.", "start")

    def _describe(self, message: str, compact_message: str) -> str:
        (ar, ac), (gr, gc) = self._agent, self._grid.goal
        if self.config.compact:
            rows = " / ".join(" ".join(row) for row in self._grid.render(self._agent).splitlines())
            return f"{compact_message} ; {rows} ; {AGENT} {ar} {ac} {GOAL} {gr} {gc}"
        return (
            f"{message}\n{self._grid.render(self._agent)}\n"
            f"You are at row {ar}, column {ac}. The goal is at row {gr}, column {gc}."
        )

    def step(self, action: str) -> Step:
        if self._grid is None or self._done:
            raise EnvError("step() called before reset() or after the episode ended; call reset(task)")
        self._turns += 1
        move = parse_move(action)
        if move is None:
            message = f"Invalid action {action.strip()[:40]!r}. Reply with one of: up, down, left, right."
            short = "invalid"
        else:
            dr, dc = MOVES[move]
            target = (self._agent[0] + dr, self._agent[1] + dc)
            if self._grid.free(target):
                self._agent = target
                message, short = f"You moved {move}.", f"moved {move}"
            else:
                message, short = f"You bump into a wall moving {move}.", f"blocked {move}"
        info = {"invalid": move is None, "turn": self._turns}
        if self._agent == self._grid.goal:
            self._done = True
            info.update(success=True, truncated=False)
            reward = self._optimal / self._turns
            if self.config.compact:
                return Step(f"{short} ; goal in {self._turns} moves", reward, True, info)
            return Step(f"{message} You reached the goal in {self._turns} moves.", reward, True, info)
        if self._turns >= self.max_turns:
            self._done = True
            info.update(success=False, truncated=True)
            if self.config.compact:
                return Step(f"{short} ; out of moves", 0.0, True, info)
            return Step(f"{message} Out of moves: the goal was not reached.", 0.0, True, info)
        return Step(self._describe(message, short), 0.0, False, info)

    def action_span(self, reply: str) -> tuple[int, int] | None:
        """The move word :func:`parse_move` reads (None: the reply names no move)."""
        return _move_span(reply) if parse_move(reply) is not None else None

    def expert_action(self) -> str:
        r, c = self._agent
        best = min(
            (self._distances.get((r + dr, c + dc), self._grid.size**2), move)
            for move, (dr, dc) in MOVES.items()
        )
        return best[1]

    def random_action(self, rng: random.Random) -> str:
        return rng.choice(sorted(MOVES))
