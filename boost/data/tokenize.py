"""Turn-by-turn tokenisation with the tokenizer's chat template, an agent-token mask and labels.

Why turn by turn: tokenising a whole rendered conversation at once lets BPE merge characters
across a turn border (the end of an assistant reply with the text after it), so the ids of an
assistant turn would differ from the ids the model generated. Here the template is rendered for
every prefix of the conversation; the text each message adds (its *delta*) is split into
``lead`` (template text before the content), ``content`` and ``tail`` (template text after it),
and each piece is tokenised on its own:

- ``lead`` and ``tail`` are template text: special tokens written by the template are parsed.
- ``content`` is message text: a special-token string inside it (say a literal ``<|im_end|>``)
  is encoded as plain text, as a model cannot emit a control token in the middle of its reply.
  Such messages are counted in the report.

The agent mask is True on the content tokens of assistant messages and, with ``train_on_eot``,
on the end-of-turn token(s): the tail tokens up to and including its first special token (e.g.
``<|im_end|>``, but not the newline after it). Labels are next-token targets: ``labels[t] =
input_ids[t+1]`` where ``agent_mask[t+1]``, else ``-100`` (and ``-100`` at the last token).

The template must be *prefix-stable* (rendering the first k+1 messages extends the rendering of the
first k) and its generation prompt must equal the header it writes before an assistant reply; both
are checked on a probe conversation when a :class:`TurnTokenizer` is built, and prefix stability
again on every trajectory. A template that fails either raises :class:`ChatTemplateError`.

Tokenizers whose SentencePiece model prepends a space to every encoded string (Llama-2 style
"legacy" tokenizers) give a leading ``▁`` on each piece; byte-level BPE tokenizers (GPT-2, Llama 3,
Qwen, SmolLM) do not.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from boost.data.format import Trajectory

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_DROPPED_EXAMPLES = 20  # dropped trajectories named one by one in a report; the rest are counted

# A plain ChatML template. Never applied silently: pass it as TokenizeConfig(chat_template=...) to
# opt in for a tokenizer that ships without a template and whose model was trained on ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MARKER = "\ue000boost-content-marker\ue001"  # private-use code points: never in a template's own text


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used for turn-by-turn tokenisation; the message says why."""


@dataclass
class TokenizeConfig:
    """How trajectories become token ids.

    Attributes:
        max_length: the most tokens a trajectory may keep (packing needs ``max_length <= token_budget``).
        on_too_long: ``"keep_first_turns"`` keeps the longest prefix of whole messages that fits and
            ends with an assistant message (dropped when not even the first assistant turn fits);
            ``"drop"`` drops the trajectory. Both are counted in :class:`TokenizeReport`.
        train_on_eot: also count the end-of-turn token(s) that close each assistant message.
        chat_template: a Jinja template that replaces ``tokenizer.chat_template`` (e.g. :data:`CHATML_TEMPLATE`).
        batch_size: trajectories per batched tokenizer call.
    """

    max_length: int = 4096
    on_too_long: Literal["keep_first_turns", "drop"] = "keep_first_turns"
    train_on_eot: bool = True
    chat_template: str | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.on_too_long not in ("keep_first_turns", "drop"):
            raise ValueError(f"on_too_long must be 'keep_first_turns' or 'drop', got {self.on_too_long!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class TokenizedTrajectory:
    """One trajectory as token ids.

    Attributes:
        input_ids: ``[L]`` int32 token ids.
        agent_mask: ``[L]`` bool, True where the token was produced by the agent and is trained on.
        index: position of the trajectory in the list given to :func:`tokenize_trajectories`.
        source, reward, task_id: copied from the :class:`Trajectory`.
        num_messages: messages kept (fewer than the trajectory's when ``truncated``).
        truncated: the last messages were cut by the length policy.
    """

    input_ids: np.ndarray
    agent_mask: np.ndarray
    index: int
    source: str
    reward: float | None
    task_id: str | None
    num_messages: int
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_counted(self) -> int:
        """Tokens that carry a label (agent tokens after position 0): N_i of the per-trajectory mean."""
        return int(self.agent_mask[1:].sum())

    def labels(self) -> np.ndarray:
        """``[L]`` int64 next-token labels: ``input_ids[t+1]`` where ``agent_mask[t+1]``, else -100."""
        labels = np.full(self.length, IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(self.agent_mask[1:], self.input_ids[1:], IGNORE_INDEX)
        return labels


@dataclass
class TokenizeReport:
    """What tokenisation did.

    Attributes:
        trajectories: trajectories in.
        kept: trajectories out (including truncated ones).
        truncated: kept with their last messages cut to fit ``max_length``.
        dropped: reason -> trajectories dropped (``too_long`` under ``on_too_long="drop"``,
            ``first_assistant_turn_too_long`` when not even one assistant turn fits).
        messages_cut, tokens_cut: messages and tokens removed by truncation.
        tokens, counted_tokens: tokens kept, and those that carry a label.
        special_text_messages: messages whose content holds a special-token string (encoded as text).
        assistant_turns_without_eot: assistant turns whose tail had no special token to count.
        messages_cut_untokenised: cut messages that were never tokenised (their text alone is too long).
        truncated_by_source: source -> truncated trajectories (they keep the whole episode's reward).
        dropped_examples: ``"path:line (source): reason: detail"`` of the first
            :data:`MAX_DROPPED_EXAMPLES` dropped trajectories; the counts in ``dropped`` cover all.
    """

    trajectories: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    messages_cut: int = 0
    tokens_cut: int = 0
    tokens: int = 0
    counted_tokens: int = 0
    special_text_messages: int = 0
    assistant_turns_without_eot: int = 0
    messages_cut_untokenised: int = 0
    truncated_by_source: Counter[str] = field(default_factory=Counter)
    dropped_examples: list[str] = field(default_factory=list)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        lines = [
            f"tokenised {self.trajectories} trajectories: kept {self.kept} ({self.truncated} truncated), "
            f"dropped {self.num_dropped}; {self.tokens} tokens, {self.counted_tokens} counted"
        ]
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {n} x {reason}")
        lines.extend(f"    {example}" for example in self.dropped_examples)
        if self.num_dropped > len(self.dropped_examples):
            lines.append(f"    ... and {self.num_dropped - len(self.dropped_examples)} more")
        if self.truncated:
            lines.append(
                f"  truncation cut {self.messages_cut} messages ({self.tokens_cut} tokens"
                + (
                    f" of tokenised messages; {self.messages_cut_untokenised} messages past the limit never tokenised)"
                    if self.messages_cut_untokenised
                    else ")"
                )
            )
            per_source = ", ".join(f"{source} {n}" for source, n in sorted(self.truncated_by_source.items()))
            lines.append(
                f"  truncated per source: {per_source} (their reward is the whole episode's; the batch "
                "marks them in PackedBatch.truncated)"
            )
        if self.special_text_messages:
            lines.append(f"  {self.special_text_messages} messages hold special-token text (encoded as text)")
        if self.assistant_turns_without_eot:
            lines.append(f"  {self.assistant_turns_without_eot} assistant turns had no end-of-turn token")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class _Encoded:
    """Token ids of a whole trajectory, before the length policy."""

    ids: list[int]
    agent: list[bool]
    message_ends: list[int]  # token offset just after each message


class TurnTokenizer:
    """Renders and tokenises conversations turn by turn with a Hugging Face tokenizer.

    Args:
        tokenizer: a ``transformers`` tokenizer (tested with fast ones) with a chat template, or any
            tokenizer when ``config.chat_template`` is given.
        config: see :class:`TokenizeConfig`.

    Raises:
        ChatTemplateError: no template, or one that is not prefix-stable, whose generation prompt
            differs from its assistant header, or (with ``train_on_eot``) that writes no special
            token after an assistant reply.
    """

    def __init__(self, tokenizer: Any, config: TokenizeConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or TokenizeConfig()
        self.chat_template = self.config.chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ChatTemplateError(
                f"{type(tokenizer).__name__} has no chat template, so the turns cannot be templated as the "
                "model expects. Set tokenizer.chat_template to the model's template, or opt in to a generic "
                "one with TokenizeConfig(chat_template=boost.data.tokenize.CHATML_TEMPLATE) if the model "
                "was trained on ChatML."
            )
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.special_ids = frozenset(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        special_strings = sorted(
            {s for s in tokenizer.convert_ids_to_tokens(sorted(self.special_ids)) if s}, key=len, reverse=True
        )
        self._special_text = (
            re.compile("|".join(map(re.escape, special_strings))) if special_strings else None
        )
        self._probe()

    # -- rendering ---------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages`` as text (no tokenisation)."""
        return self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=self.chat_template,
        )

    def split_turns(self, messages: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
        """Per message, the ``(lead, content, tail)`` text it adds to the rendered conversation.

        Concatenating all pieces gives exactly ``render(messages)``.
        """
        pieces = []
        previous = ""
        for k in range(len(messages)):
            rendered = self.render(messages[: k + 1])
            if not rendered.startswith(previous):
                raise ChatTemplateError(
                    f"the chat template is not prefix-stable: rendering messages[:{k + 1}] does not extend the "
                    f"rendering of messages[:{k}] (the template rewrites earlier turns), so turn-by-turn ids "
                    "would not match what the model saw"
                )
            delta = rendered[len(previous) :]
            pieces.append(self._split_delta(delta, messages, k, previous))
            previous = rendered
        return pieces

    def _split_delta(
        self, delta: str, messages: Sequence[dict[str, Any]], k: int, previous: str
    ) -> tuple[str, str, str]:
        content = messages[k]["content"]
        start = delta.find(content)
        if start < 0:  # templates such as Llama 3's trim the content
            content = content.strip()
            start = delta.find(content)
        if start < 0:
            raise ChatTemplateError(
                f"messages[{k}] ({messages[k]['role']}): the chat template changes the content (it does not "
                "appear verbatim, even stripped, in the rendered turn), so its tokens cannot be aligned"
            )
        if delta.find(content, start + 1) >= 0:  # the content also occurs in the template text
            start = self._locate_content(delta, messages, k, previous, content)
        return delta[:start], content, delta[start + len(content) :]

    def _locate_content(
        self, delta: str, messages: Sequence[dict[str, Any]], k: int, previous: str, content: str
    ) -> int:
        """Find where the content starts by rendering a marker in its place."""
        probe = [*messages[:k], {**messages[k], "content": _MARKER}]
        rendered = self.render(probe)
        start = rendered.find(_MARKER, len(previous)) - len(previous)
        if start < 0 or not rendered.startswith(previous) or delta[start : start + len(content)] != content:
            raise ChatTemplateError(
                f"messages[{k}] ({messages[k]['role']}): cannot tell where the content starts in the "
                "rendered turn (it occurs several times and the template treats it specially)"
            )
        return start

    def _probe(self) -> None:
        """Check the template on small conversations before any data goes through it."""
        conversations = [
            [
                {"role": "system", "content": "Probe system text."},
                {"role": "user", "content": "Probe question one."},
                {"role": "assistant", "content": "Probe answer one."},
                {"role": "user", "content": "Probe question two."},
                {"role": "assistant", "content": "Probe answer two."},
            ],
            [
                {"role": "user", "content": "Probe question."},
                {"role": "assistant", "content": "Probe answer."},
            ],
        ]
        for messages in conversations:
            try:
                pieces = self.split_turns(messages)
            except ChatTemplateError as err:
                raise ChatTemplateError(f"chat template failed the probe conversation: {err}") from None
            rendered = ""
            for k, (lead, _, tail) in enumerate(pieces):
                if messages[k]["role"] == "assistant":
                    prompt = self.render(messages[:k], generation_prompt=True)
                    if prompt != rendered + lead:
                        raise ChatTemplateError(
                            "the chat template's generation prompt differs from the header it writes before "
                            f"an assistant reply ({prompt[len(rendered) :]!r} vs {lead!r}), so the rendered "
                            "turns are not what the model saw when it generated them"
                        )
                    if self.config.train_on_eot and not self._eot_length(self._encode([tail])[0]):
                        raise ChatTemplateError(
                            f"train_on_eot is set but the template writes no special token after an assistant "
                            f"reply (tail {tail!r}); set TokenizeConfig(train_on_eot=False)"
                        )
                rendered += "".join(pieces[k])

    # -- tokenising --------------------------------------------------------------------------------

    def _encode(self, texts: list[str], as_text: bool = False) -> list[list[int]]:
        """Token ids of each text; ``as_text`` encodes special-token strings as plain text."""
        if not texts:
            return []
        return self.tokenizer(
            texts,
            add_special_tokens=False,
            split_special_tokens=as_text,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def _eot_length(self, tail_ids: list[int]) -> int:
        """How many tail tokens close the turn: up to and including the first special token (0 if none)."""
        for i, token in enumerate(tail_ids):
            if token in self.special_ids:
                return i + 1
        return 0

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of ``text``, without tokenising it (O(len(text)), no BPE).

        Every token stands for at most :attr:`max_token_bytes` bytes of (normalised) text.
        """
        normalizer = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "normalizer", None)
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        return -(-len(text.encode("utf-8", "surrogatepass")) // self.max_token_bytes)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest vocabulary entry in UTF-8 bytes: an upper bound on the text bytes of one token
        (byte-level and byte-fallback entries spell a byte with one or more characters)."""
        return max(
            1, max(len(token.encode("utf-8", "surrogatepass")) for token in self.tokenizer.get_vocab())
        )

    def messages_that_may_fit(self, messages: Sequence[dict[str, Any]]) -> int:
        """How many leading messages could fit ``max_length`` tokens by :meth:`min_tokens` of their
        content alone; the messages after them cannot, so they are never tokenised."""
        total = 0
        for k, message in enumerate(messages):
            total += self.min_tokens(message["content"])
            if total > self.config.max_length:
                return k
        return len(messages)

    def encode(
        self,
        trajectories: Sequence[Trajectory],
        report: TokenizeReport,
        first_index: int | Sequence[int] = 0,
        num_messages: Sequence[int] | None = None,
    ) -> list[_Encoded]:
        """Token ids and agent masks of trajectories (one batched tokenizer call per piece kind).

        ``first_index`` is the position of ``trajectories[0]`` in the caller's list, or the positions of
        all of them (for error messages, which name the file and line instead where it is known);
        ``num_messages`` (default: all) how many leading messages of each to tokenise.
        """
        template_text: list[str] = []
        content_text: list[str] = []
        layout: list[
            list[tuple[str, int, int]]
        ] = []  # per trajectory, per message: role, lead idx, content idx
        for t, traj in enumerate(trajectories):
            index = first_index[t] if isinstance(first_index, Sequence) else first_index + t
            messages = traj.messages if num_messages is None else traj.messages[: num_messages[t]]
            try:
                pieces = self.split_turns(messages)
            except Exception as err:  # the template's own raise_exception(...) gives a jinja2 error
                raise ChatTemplateError(
                    f"{traj.origin or f'trajectory {index}'} (source {traj.source!r}): {type(err).__name__}: {err}"
                ) from err
            turns = []
            for message, (lead, content, tail) in zip(messages, pieces):
                turns.append((message["role"], len(template_text), len(content_text)))
                template_text += [lead, tail]
                content_text.append(content)
                if self._special_text is not None and self._special_text.search(content):
                    report.special_text_messages += 1
            layout.append(turns)
        template_ids = self._encode(template_text)
        content_ids = self._encode(content_text, as_text=True)
        encoded = []
        for turns in layout:
            ids: list[int] = []
            agent: list[bool] = []
            ends: list[int] = []
            for role, lead_at, content_at in turns:
                lead, tail, content = (
                    template_ids[lead_at],
                    template_ids[lead_at + 1],
                    content_ids[content_at],
                )
                is_agent = role == "assistant"
                eot = self._eot_length(tail) if is_agent and self.config.train_on_eot else 0
                if is_agent and self.config.train_on_eot and eot == 0:
                    report.assistant_turns_without_eot += 1
                ids += lead + content + tail
                agent += [False] * len(lead) + [is_agent] * len(content)
                agent += [True] * eot + [False] * (len(tail) - eot)
                ends.append(len(ids))
            encoded.append(_Encoded(ids=ids, agent=agent, message_ends=ends))
        return encoded


def _first_assistant(messages: Sequence[dict[str, Any]], limit: int) -> bool:
    return any(m["role"] == "assistant" for m in messages[:limit])


def _drop(traj: Trajectory, index: int, reason: str, detail: str, report: TokenizeReport) -> None:
    report.dropped[reason] += 1
    if len(report.dropped_examples) < MAX_DROPPED_EXAMPLES:
        where = traj.origin or f"trajectory {index}"
        report.dropped_examples.append(f"{where} (source {traj.source!r}): {reason}: {detail}")


def _apply_length_policy(
    enc: _Encoded, traj: Trajectory, index: int, config: TokenizeConfig, report: TokenizeReport
) -> int | None:
    """How many messages to keep, or None to drop the trajectory (counted in ``report``).

    ``enc`` may cover only the leading messages that could fit (see :meth:`TurnTokenizer.messages_that_may_fit`).
    """
    num_messages = len(traj.messages)
    encoded = len(enc.message_ends)
    if encoded == num_messages and enc.message_ends[-1] <= config.max_length:
        return num_messages
    if config.on_too_long == "drop":
        _drop(traj, index, "too_long", f"more than max_length={config.max_length} tokens", report)
        return None
    keep = 0
    for k, end in enumerate(enc.message_ends):
        if end > config.max_length:
            break
        if traj.messages[k]["role"] == "assistant":
            keep = k + 1
    if keep == 0:
        _drop(traj, index, "first_assistant_turn_too_long",
              f"the messages up to the first assistant turn exceed max_length={config.max_length} tokens",
              report)  # fmt: skip
        return None
    report.truncated += 1
    report.messages_cut += num_messages - keep
    report.messages_cut_untokenised += num_messages - encoded
    report.tokens_cut += enc.message_ends[-1] - enc.message_ends[keep - 1]
    report.truncated_by_source[traj.source] += 1
    return keep


def tokenize_trajectories(
    trajectories: Sequence[Trajectory],
    tokenizer: Any,
    config: TokenizeConfig | None = None,
    name: str | None = None,
) -> tuple[list[TokenizedTrajectory], TokenizeReport]:
    """Tokenise trajectories turn by turn and apply the length policy.

    Returns:
        The kept trajectories in input order (``index`` points into ``trajectories``) and the report,
        which is also logged (at WARNING level when anything was dropped or truncated), after
        ``name: `` when a name (e.g. the split) is given.
    """
    config = config or TokenizeConfig()
    turn_tokenizer = TurnTokenizer(tokenizer, config)
    report = TokenizeReport(trajectories=len(trajectories))
    out: list[TokenizedTrajectory] = []
    for start in range(0, len(trajectories), config.batch_size):
        chunk = []  # (index, trajectory, messages to tokenise): the rest cannot fit max_length
        for index in range(start, min(start + config.batch_size, len(trajectories))):
            traj = trajectories[index]
            limit = turn_tokenizer.messages_that_may_fit(traj.messages)
            if limit < len(traj.messages) and config.on_too_long == "drop":
                _drop(traj, index, "too_long", f"more than max_length={config.max_length} tokens", report)
            elif not _first_assistant(traj.messages, limit):
                _drop(traj, index, "first_assistant_turn_too_long",
                      f"the text up to the first assistant turn alone exceeds max_length={config.max_length} "
                      "tokens (not tokenised)", report)  # fmt: skip
            else:
                chunk.append((index, traj, limit))
        encoded = turn_tokenizer.encode(
            [traj for _, traj, _ in chunk],
            report,
            [index for index, *_ in chunk],
            num_messages=[limit for *_, limit in chunk],
        )
        for (index, traj, _), enc in zip(chunk, encoded):
            keep = _apply_length_policy(enc, traj, index, config, report)
            if keep is None:
                continue
            length = enc.message_ends[keep - 1]
            item = TokenizedTrajectory(
                input_ids=np.asarray(enc.ids[:length], dtype=np.int32),
                agent_mask=np.asarray(enc.agent[:length], dtype=bool),
                index=index,
                source=traj.source,
                reward=traj.reward,
                task_id=traj.task_id,
                num_messages=keep,
                truncated=keep < len(traj.messages),
            )
            report.kept += 1
            report.tokens += item.length
            report.counted_tokens += item.num_counted
            out.append(item)
    level = (
        logging.WARNING
        if report.num_dropped or report.truncated or report.assistant_turns_without_eot
        else logging.INFO
    )
    log.log(level, "%s%s", f"{name}: " if name else "", report.summary())
    return out, report
