"""Prompt and completion tokenization, in one place so every stage sees the same token ids.

A plain-text prompt is wrapped as one user message when the tokenizer has a chat template (instruct models
expect it); chat prompts require one. Completions of offline preference data are tokenized as the tail of
the full conversation, and the prompt's tokens must be a prefix of it: a template that re-renders earlier
turns differently is caught here instead of silently shifting the completion mask.
"""

from __future__ import annotations

import json

from dpo_ray.errors import InputError

ROLES = ("system", "user", "assistant")


class TokenizationError(InputError):
    pass


def prompt_messages(prompt: str | None, messages_json: str | None, system_prompt: str | None) -> list[dict]:
    messages = json.loads(messages_json) if messages_json else [{"role": "user", "content": prompt}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def sampled_messages_json(prompt: str | None, messages_json: str | None, system_prompt: str | None) -> str | None:
    """The conversation a sampler rendered for a prompt (`data.system_prompt` applied), as COMPLETIONS keeps it so
    a labeler can show the whole of it; None for a plain-text prompt without a system prompt, which is its text."""
    if not messages_json and not system_prompt:
        return None
    return json.dumps(prompt_messages(prompt, messages_json, system_prompt))


# Anthropic-HH's turn names, the one plain-text conversation form data.preferences reads.
_TEXT_ROLES = {"user": "Human", "assistant": "Assistant"}


def conversation_text(messages: list[dict]) -> str:
    """A chat as plain text that keeps its turns, for a model without a chat template: a system message as a
    paragraph of its own first (as render_prompt puts data.system_prompt before a plain prompt), then each turn as
    "Human: ..." or "Assistant: ..." (Anthropic-HH's form), a blank line between."""
    return "\n\n".join(m["content"] if m["role"] == "system" else f"{_TEXT_ROLES[m['role']]}: {m['content']}"
                       for m in messages)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, prompt: str | None, messages_json: str | None, system_prompt: str | None) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            prompt_messages(prompt, messages_json, system_prompt), tokenize=False, add_generation_prompt=True
        )
    if messages_json:
        raise TokenizationError(
            f"chat prompts need a tokenizer with a chat template; {tokenizer.name_or_path} has none"
        )
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt


def truncate_prompt(ids: list[int], max_tokens: int, policy: str) -> tuple[list[int], bool]:
    if len(ids) <= max_tokens:
        return ids, False
    return (ids[-max_tokens:] if policy == "keep_end" else ids[:max_tokens]), True


def prompt_token_ids(tokenizer, prompt, messages_json, system_prompt, max_tokens: int, policy: str):
    """(ids, truncated) of a prompt rendered for generation."""
    text = render_prompt(tokenizer, prompt, messages_json, system_prompt)
    # A chat template writes its own special tokens; plain text gets the tokenizer's (BOS, typically).
    ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    return truncate_prompt(ids, max_tokens, policy)


def completion_token_ids(tokenizer, prompt, messages_json, system_prompt, completion: str) -> list[int]:
    """Token ids of `completion` as the assistant's reply to the prompt, ending in EOS."""
    eos = tokenizer.eos_token_id
    if tokenizer.eos_token and tokenizer.eos_token in completion:
        # It would tokenize to EOS and end the reply there, the rest silently untrained.
        raise TokenizationError(f"contains the tokenizer's end-of-turn text {tokenizer.eos_token!r}")
    if tokenizer.chat_template:
        messages = prompt_messages(prompt, messages_json, system_prompt)
        prompt_ids = _encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True))
        full_ids = _encode(tokenizer, tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": completion}], tokenize=False
        ))
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise TokenizationError("prompt tokens are not a prefix of prompt+completion tokens (chat template)")
        ids = full_ids[len(prompt_ids):]
        # Templates append text after the end-of-turn token; the model's own samples stop at EOS.
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        return ids
    return _encode(tokenizer, completion) + ([eos] if eos is not None else [])


def decode_completion(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)
