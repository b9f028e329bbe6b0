"""Adapter for TextWorld text adventures (optional: ``pip install boost[envs]``).

Games are generated locally, as ``tw-make custom`` does, from a seed and the variant's options
(rooms, objects, quest length); nothing is downloaded. A generated game is cached under
``games_dir`` (default ``$BOOST_TEXTWORLD_GAMES`` or ``~/.cache/boost/textworld``) and reused.

The expert follows TextWorld's walkthrough, recomputed from the current state (``policy_commands``),
so it also recovers after off-policy moves. The reward of a step is the change in score divided by
the maximum score (the return of a won game is 1); success means the game was won. A command the
game does not accept is answered by the game itself ("That's not a verb I recognise.") and counted
as invalid when it was not among the admissible commands.

Splits are by seed (the key is the seed); two seeds building the same game is vanishingly unlikely
for worlds of several rooms, but not checked, so ``content_disjoint_splits`` is False.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boost.envs.base import Env, EnvError, Step, Task

# The status line TextWorld appends to each feedback: ">   -= Room =-score/moves".
_STATUS_LINE = re.compile(r"\n?>\s*(-=.*=-)?\s*\d*/?\d*\s*$")
# What the Z-machine interpreter asks once the story has ended.
_END_PROMPT = re.compile(r"Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command\?")


@dataclass(frozen=True)
class TextWorldConfig:
    """Options of ``tw-make custom``: ``--world-size``, ``--nb-objects``, ``--quest-length``."""

    nb_rooms: int = 3
    nb_objects: int = 4
    quest_length: int = 3
    max_turns: int = 30

    def __post_init__(self) -> None:
        for name in ("nb_rooms", "nb_objects", "quest_length", "max_turns"):
            if getattr(self, name) < 1:
                raise EnvError(f"TextWorldConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def tag(self) -> str:
        return f"r{self.nb_rooms}-o{self.nb_objects}-q{self.quest_length}"


def import_textworld() -> Any:
    try:
        import textworld
    except ImportError as err:
        raise EnvError(
            "TextWorld environments need the optional 'textworld' package: pip install 'boost[envs]'"
        ) from err
    return textworld


def default_games_dir() -> Path:
    return Path(os.environ.get("BOOST_TEXTWORLD_GAMES", Path.home() / ".cache" / "boost" / "textworld"))


def clean_feedback(text: str) -> str:
    """TextWorld feedback without its status line, the interpreter's end-of-game prompt, indentation
    and runs of blank lines."""
    text = _STATUS_LINE.sub("", text.rstrip())
    lines = [line.strip() for line in text.splitlines() if not _END_PROMPT.match(line.strip())]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


class TextWorldEnv(Env):
    """A TextWorld game per task. See the module docstring."""

    content_disjoint_splits = False

    def __init__(
        self,
        name: str = "textworld",
        config: TextWorldConfig | None = None,
        games_dir: str | Path | None = None,
    ) -> None:
        self._tw = import_textworld()
        self.name = name
        self.config = config or TextWorldConfig()
        self.max_turns = self.config.max_turns
        self.games_dir = Path(games_dir) if games_dir is not None else default_games_dir()
        self._game: Any = None

    def task_key(self, seed: int) -> str:
        return f"{self.name}|{self.config.tag}|seed:{seed}"

    def game_file(self, seed: int) -> Path:
        """The compiled game of task ``seed``, generated on first use."""
        path = self.games_dir / f"{self.config.tag}-s{seed}.z8"
        if path.exists():
            return path
        self.games_dir.mkdir(parents=True, exist_ok=True)
        # Generate in a private folder, then move the game description (.json) and the story file
        # (.z8, moved last: its presence marks a complete game) into place.
        with tempfile.TemporaryDirectory(dir=self.games_dir, prefix=".tmp-") as tmp:
            options = self._tw.GameOptions()
            options.nb_rooms = self.config.nb_rooms
            options.nb_objects = self.config.nb_objects
            options.quest_length = self.config.quest_length
            options.seeds = seed
            options.path = str(Path(tmp) / path.name)
            options.force_recompile = True
            self._tw.make(options)
            os.replace(Path(tmp) / path.with_suffix(".json").name, path.with_suffix(".json"))
            os.replace(Path(tmp) / path.name, path)
        return path

    @property
    def instructions(self) -> str:
        return (
            "You are playing a text adventure. Each turn, reply with one command such as "
            "'go north', 'take key', 'open chest', 'unlock door with key', 'put apple on table', "
            f"'inventory' or 'look'. Complete the objective within {self.max_turns} commands."
        )

    def reset(self, task: Task) -> str:
        self._check_task(task)
        self.close()
        infos = self._tw.EnvInfos(
            feedback=True,
            description=True,
            objective=True,
            won=True,
            lost=True,
            score=True,
            max_score=True,
            policy_commands=True,
            admissible_commands=True,
        )
        with warnings.catch_warnings():
            # jericho warns that it cannot track the score of TextWorld's story files; TextWorld's
            # own wrapper tracks it (the "score" we read), so the warning does not apply here.
            warnings.filterwarnings("ignore", message=".*is not fully supported.*")
            self._game = self._tw.start(str(self.game_file(task.seed)), request_infos=infos)
        self._state = self._game.reset()
        self._score = 0.0
        self._turns = 0
        self._done = False
        return f"{self._state.objective.strip()}\n\n{clean_feedback(self._state.description)}"

    def step(self, action: str) -> Step:
        if self._game is None or self._done:
            raise EnvError("step() called before reset() or after the episode ended; call reset(task)")
        command = action.strip().splitlines()[0].strip() if action.strip() else ""
        invalid = command not in self._state.admissible_commands
        self._turns += 1
        self._state, score, done = self._game.step(command)
        reward = (float(score) - self._score) / max(float(self._state.max_score), 1.0)
        self._score = float(score)
        info: dict[str, Any] = {"invalid": invalid, "turn": self._turns}
        observation = clean_feedback(self._state.feedback) or "(no output)"
        won = bool(self._state.won)
        if done or self._turns >= self.max_turns:
            self._done = True
            info.update(success=won, truncated=not done)
            if not done:
                observation += "\nOut of turns: the objective was not completed."
        return Step(observation, reward, self._done, info)

    def expert_action(self) -> str:
        plan = self._state.policy_commands
        # An off-policy move (say, eating a quest item) can make the game unwinnable without losing
        # it; TextWorld then has no walkthrough and the expert just looks around until time runs out.
        return plan[0] if plan else "look"

    def random_action(self, rng: random.Random) -> str:
        return rng.choice(sorted(self._state.admissible_commands))

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None
