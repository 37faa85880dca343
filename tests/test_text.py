"""Prompt and completion tokenization with the built-in tiny-llama tokenizer (SmolLM2's, with a chat template)."""

from __future__ import annotations

import copy
import json

import pytest

from dpo_ray.text import (
    TokenizationError,
    completion_token_ids,
    decode_completion,
    prompt_messages,
    prompt_token_ids,
    render_prompt,
    truncate_prompt,
)

GEN_HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def no_template_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)  # a separate object: the session tokenizer keeps its template
    tok.chat_template = None
    assert tokenizer.chat_template
    return tok


def header_ids(tokenizer):
    return tokenizer(GEN_HEADER, add_special_tokens=False)["input_ids"]


def test_plain_prompt_gets_chat_template(tokenizer):
    ids, truncated = prompt_token_ids(tokenizer, "Review the film Alien.", None, None, 512, "keep_end")
    assert truncated is False
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nReview the film Alien.<|im_end|>" in text
    assert text.endswith(GEN_HEADER)
    assert ids[-len(header_ids(tokenizer)):] == header_ids(tokenizer)


def test_system_prompt_and_chat_messages(tokenizer):
    ids, _ = prompt_token_ids(tokenizer, "Q", None, "Answer in French.", 512, "keep_end")
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nAnswer in French.<|im_end|>")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"}]
    ids, _ = prompt_token_ids(tokenizer, "Again", json.dumps(messages), None, 512, "keep_end")
    text = tokenizer.decode(ids)
    assert "<|im_start|>assistant\nHello<|im_end|>" in text and text.endswith(GEN_HEADER)
    # A chat prompt that brings its own system message is not given a second one.
    with_system = [{"role": "system", "content": "Mine."}] + messages
    assert prompt_messages(None, json.dumps(with_system), "Other.") == with_system


@pytest.mark.parametrize("policy", ["keep_end", "keep_start"])
def test_truncation(tokenizer, policy):
    prompt = "A rather long prompt about the movie " * 10
    full, truncated = prompt_token_ids(tokenizer, prompt, None, None, 10_000, policy)
    assert truncated is False
    ids, truncated = prompt_token_ids(tokenizer, prompt, None, None, 16, policy)
    assert truncated is True
    assert len(ids) == 16
    if policy == "keep_end":
        assert ids == full[-16:]
        assert tokenizer.decode(ids).endswith(GEN_HEADER)
    else:
        assert ids == full[:16]
        assert tokenizer.decode(ids).startswith("<|im_start|>system")
    exact, truncated = prompt_token_ids(tokenizer, prompt, None, None, len(full), policy)
    assert exact == full and truncated is False


def test_truncate_prompt_pure():
    assert truncate_prompt([1, 2, 3, 4, 5], 3, "keep_end") == ([3, 4, 5], True)
    assert truncate_prompt([1, 2, 3, 4, 5], 3, "keep_start") == ([1, 2, 3], True)
    assert truncate_prompt([1, 2, 3], 3, "keep_end") == ([1, 2, 3], False)


def test_completion_ends_with_eos_and_round_trips(tokenizer):
    completion = "A tense, beautifully shot film."
    ids = completion_token_ids(tokenizer, "Review Alien.", None, None, completion)
    assert ids[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.eos_token_id) == 1  # the template's trailing newline is cut
    assert decode_completion(tokenizer, ids) == completion
    # The prompt followed by the completion is exactly the rendered conversation.
    prompt_ids, _ = prompt_token_ids(tokenizer, "Review Alien.", None, None, 512, "keep_end")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Review Alien."}, {"role": "assistant", "content": completion}],
        tokenize=False,
    )
    assert tokenizer.decode(prompt_ids + ids) == full.rstrip("\n")


def test_completion_of_chat_prompt(tokenizer):
    messages = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Again"}])
    ids = completion_token_ids(tokenizer, "Again", messages, None, "Sure thing!")
    assert ids[-1] == tokenizer.eos_token_id
    assert decode_completion(tokenizer, ids) == "Sure thing!"


def test_no_chat_template_rejects_chat_prompt(no_template_tokenizer):
    messages = json.dumps([{"role": "user", "content": "Hi"}])
    with pytest.raises(TokenizationError, match="chat template"):
        prompt_token_ids(no_template_tokenizer, "Hi", messages, None, 64, "keep_end")
    with pytest.raises(TokenizationError):
        render_prompt(no_template_tokenizer, "Hi", messages, None)


def test_no_chat_template_plain_text(no_template_tokenizer):
    tok = no_template_tokenizer
    assert render_prompt(tok, "Hello", None, "Sys") == "Sys\n\nHello"
    ids, truncated = prompt_token_ids(tok, "Hello there", None, None, 64, "keep_end")
    assert tok.decode(ids, skip_special_tokens=True) == "Hello there" and truncated is False
    ids = completion_token_ids(tok, "Hello there", None, None, "Nice.")
    assert ids[-1] == tok.eos_token_id and decode_completion(tok, ids) == "Nice."
