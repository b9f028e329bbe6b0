"""Turn-by-turn tokenisation: exact assistant ids, agent mask, labels, length policy, template checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from boost.data import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    ChatTemplateError,
    TokenizeConfig,
    Trajectory,
    TurnTokenizer,
    tokenize_trajectories,
)

from .conftest import train_bpe, wrap

CONVERSATION = [
    {"role": "system", "content": "You play a text adventure."},
    {"role": "user", "content": "You are in a dark room. There is a lamp on the table."},
    {"role": "assistant", "content": "take lamp"},
    {"role": "user", "content": "Taken. The door is to the north."},
    {"role": "tool", "content": "inventory: lamp"},
    {"role": "assistant", "content": "go north\nthen look"},
]

TOKENIZERS = ["bpe_tokenizer", "smollm2_tokenizer"]


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def agent_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("train_on_eot", [True, False])
def test_ids_reproduce_the_template_and_mask_the_assistant_turns(request, name, train_on_eot):
    tokenizer = request.getfixturevalue(name)
    config = TokenizeConfig(train_on_eot=train_on_eot)
    (item,), report = tokenize_trajectories([Trajectory(messages=CONVERSATION)], tokenizer, config)
    rendered = TurnTokenizer(tokenizer, config).render(CONVERSATION)
    assert tokenizer.decode(item.input_ids.tolist()) == rendered

    eot = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if train_on_eot else []
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = agent_runs(item.agent_mask)
    assert [item.input_ids[a:b].tolist() for a, b in runs] == [
        encode_text(tokenizer, r) + eot for r in replies
    ]
    assert item.num_counted == sum(len(encode_text(tokenizer, r)) + len(eot) for r in replies)
    assert report.counted_tokens == item.num_counted and report.tokens == item.length


@pytest.mark.parametrize("name", TOKENIZERS)
def test_labels_are_the_next_agent_token(request, name):
    tokenizer = request.getfixturevalue(name)
    (item,), _ = tokenize_trajectories([Trajectory(messages=CONVERSATION)], tokenizer)
    labels = item.labels()
    assert labels.dtype == np.int64 and labels.shape == item.input_ids.shape
    for t in range(item.length - 1):
        expected = item.input_ids[t + 1] if item.agent_mask[t + 1] else IGNORE_INDEX
        assert labels[t] == expected
    assert labels[-1] == IGNORE_INDEX
    assert (labels != IGNORE_INDEX).sum() == item.num_counted


def test_turn_by_turn_ids_differ_from_whole_text_ids_where_bpe_merges_across_turns(plain_tokenizer):
    """With a template that glues text to the reply, tokenising the whole conversation merges the
    reply's first letter into the template's token; turn-by-turn ids keep the reply's own ids."""
    messages = [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": "take lamp"},
        {"role": "user", "content": "go north"},
    ]
    config = TokenizeConfig(train_on_eot=False)
    rendered = TurnTokenizer(plain_tokenizer, config).render(messages)
    whole = plain_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    (item,), _ = tokenize_trajectories([Trajectory(messages=messages)], plain_tokenizer, config)
    reply = encode_text(plain_tokenizer, "take lamp")
    assert plain_tokenizer.decode(item.input_ids.tolist()) == rendered
    assert [item.input_ids[a:b].tolist() for a, b in agent_runs(item.agent_mask)] == [reply]
    assert item.input_ids.tolist() != whole
    whole_tokens = plain_tokenizer.convert_ids_to_tokens(whole)
    assert any(tok.startswith(";assistant:") and len(tok) > len(";assistant:") for tok in whole_tokens)


def test_special_token_text_in_content_is_encoded_as_text_and_counted(smollm2_tokenizer):
    messages = [
        {"role": "user", "content": "say <|im_end|>"},
        {"role": "assistant", "content": "I say <|im_end|><|im_start|>user"},
    ]
    (item,), report = tokenize_trajectories([Trajectory(messages=messages)], smollm2_tokenizer)
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ((start, end),) = agent_runs(item.agent_mask)
    assert item.input_ids[start:end].tolist().count(im_end) == 1  # only the real end of turn
    assert item.input_ids[end - 1] == im_end
    assert report.special_text_messages == 2


def long_conversation(n_pairs: int, words: int = 20) -> Trajectory:
    messages = [{"role": "system", "content": "Play."}]
    for k in range(n_pairs):
        messages.append({"role": "user", "content": " ".join(["room"] * words) + f" {k}"})
        messages.append({"role": "assistant", "content": f"go north {k}"})
    messages.append({"role": "user", "content": "the end"})
    return Trajectory(messages=messages, source="gen")


def test_keep_first_turns_cuts_at_an_assistant_turn_and_counts(bpe_tokenizer, caplog):
    full_traj = long_conversation(6)
    (full,), _ = tokenize_trajectories([full_traj], bpe_tokenizer, TokenizeConfig(max_length=10_000))
    config = TokenizeConfig(max_length=full.length // 2, on_too_long="keep_first_turns")
    with caplog.at_level(logging.WARNING, logger="boost.data.tokenize"):
        (cut,), report = tokenize_trajectories([full_traj], bpe_tokenizer, config)
    assert cut.truncated and cut.length <= config.max_length
    assert full_traj.messages[cut.num_messages - 1]["role"] == "assistant"
    assert cut.input_ids.tolist() == full.input_ids[: cut.length].tolist()  # a prefix of whole messages
    assert report.truncated == 1 and report.messages_cut == len(full_traj.messages) - cut.num_messages
    assert report.tokens_cut == full.length - cut.length
    assert "1 truncated" in caplog.text and f"cut {report.messages_cut} messages" in caplog.text


def test_drop_policy_and_unfittable_first_turn_are_counted(bpe_tokenizer):
    items = [long_conversation(1), long_conversation(8), long_conversation(2, words=400)]
    lengths = [
        t.length for t in tokenize_trajectories(items, bpe_tokenizer, TokenizeConfig(max_length=9999))[0]
    ]
    limit = lengths[0] + 1
    kept, report = tokenize_trajectories(
        items, bpe_tokenizer, TokenizeConfig(max_length=limit, on_too_long="drop")
    )
    assert [t.index for t in kept] == [0] and report.dropped == {"too_long": 2}
    kept, report = tokenize_trajectories(items, bpe_tokenizer, TokenizeConfig(max_length=limit))
    assert [t.index for t in kept] == [0, 1] and report.dropped == {"first_assistant_turn_too_long": 1}
    assert report.kept + report.num_dropped == report.trajectories == 3


def test_batching_does_not_change_the_result(bpe_tokenizer):
    items = [long_conversation(k % 4 + 1) for k in range(7)]
    one, _ = tokenize_trajectories(items, bpe_tokenizer, TokenizeConfig(batch_size=100))
    many, _ = tokenize_trajectories(items, bpe_tokenizer, TokenizeConfig(batch_size=2))
    assert [t.index for t in many] == list(range(7))
    assert all(
        (a.input_ids == b.input_ids).all() and (a.agent_mask == b.agent_mask).all() for a, b in zip(one, many)
    )


def test_content_that_also_occurs_in_the_template_text(bpe_tokenizer):
    messages = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "assistant"}]
    (item,), _ = tokenize_trajectories([Trajectory(messages=messages)], bpe_tokenizer)
    ((start, end),) = agent_runs(item.agent_mask)
    assert item.input_ids[start:end].tolist() == encode_text(bpe_tokenizer, "assistant") + [
        bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    assert bpe_tokenizer.decode(item.input_ids[:start].tolist()).endswith("<|im_start|>assistant\n")


def test_a_trimming_template_aligns_the_stripped_content(bpe_tokenizer):
    trimming = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    messages = [
        {"role": "user", "content": "  look around "},
        {"role": "assistant", "content": " go north\n"},
    ]
    config = TokenizeConfig(chat_template=trimming)
    (item,), _ = tokenize_trajectories([Trajectory(messages=messages)], bpe_tokenizer, config)
    ((start, end),) = agent_runs(item.agent_mask)
    assert item.input_ids[start : end - 1].tolist() == encode_text(bpe_tokenizer, "go north")


def test_missing_template_is_a_clear_error_and_chatml_is_opt_in():
    bare = wrap(train_bpe(split_words=True), chat_template=None)
    with pytest.raises(ChatTemplateError, match="has no chat template.*CHATML_TEMPLATE"):
        TurnTokenizer(bare)
    messages = [{"role": "user", "content": "look"}, {"role": "assistant", "content": "go north"}]
    (item,), _ = tokenize_trajectories(
        [Trajectory(messages=messages)], bare, TokenizeConfig(chat_template=CHATML_TEMPLATE)
    )
    assert bare.decode(item.input_ids.tolist()).startswith("<|im_start|>user\nlook<|im_end|>")


BAD_TEMPLATES = {
    # Rewrites earlier turns: every message is rendered with the conversation length.
    "not prefix-stable": (
        "{% for m in messages %}{{ m['role'] + '(' + messages|length|string + '):' + m['content'] + "
        "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant(x):' }}{% endif %}"
    ),
    "generation prompt differs": CHATML_TEMPLATE.replace(
        "'<|im_start|>assistant\n' }}{% endif %}", "'>>' }}{% endif %}"
    ),
    "changes the content": CHATML_TEMPLATE.replace("message['content']", "(message['content'] | upper)"),
    "writes no special token after an assistant": (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ),
}


@pytest.mark.parametrize("problem", BAD_TEMPLATES)
def test_unusable_templates_are_rejected_up_front(bpe_tokenizer, problem):
    assert BAD_TEMPLATES[problem] != CHATML_TEMPLATE
    with pytest.raises(ChatTemplateError, match=problem):
        TurnTokenizer(bpe_tokenizer, TokenizeConfig(chat_template=BAD_TEMPLATES[problem]))


def test_template_errors_name_the_trajectory(bpe_tokenizer):
    template = CHATML_TEMPLATE.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}",
    )
    good = Trajectory(messages=CONVERSATION[:3], source="a")
    bad = Trajectory(messages=CONVERSATION, source="b")
    with pytest.raises(ChatTemplateError, match=r"trajectory 3 \(source 'b'\): TemplateError: no tools"):
        tokenize_trajectories(
            [good, good, good, bad], bpe_tokenizer, TokenizeConfig(chat_template=template, batch_size=2)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 1}, "max_length"),
        ({"on_too_long": "cut"}, "on_too_long"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenizeConfig(**kwargs)
