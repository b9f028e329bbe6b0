"""A tiny chat model saved once per test session (built in-process; nothing comes from the hub)."""

from __future__ import annotations

import pytest

from tests.envs.tiny_chat_lm import save_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-lm"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from boost.rollout.generation import load_model

    return load_model(str(tiny_model_dir))
