"""Batching token sequences and summing a causal LM's log-probs over completion tokens only.

The same `shared_prompt_logps` scores sequences in the reference pass, the implicit labeler and evaluation (the
log-prob scorer's Ray actors) and in training (through `SequenceScorer`), so the reference log-probs that training
subtracts come from exactly the code that computes the policy's. `completion_logps` scores whole prompt+completion
rows; `shared_prompt_logps` falls back on it for models that rescale or soft-cap their logits.

Speed: each prompt runs once and its KV cache serves all its completions (chosen and rejected). The LM head
(hidden x vocab, 49152 columns for SmolLM2) dominates a small model's cost, so it is applied only at positions that
predict a completion token, and the log-softmax is never materialized over the vocabulary:
log p(t) = logit_t - logsumexp(logits), computed in fp32 whatever the model dtype.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Sequence

import torch


def precision(dtype: str, device: torch.device) -> AbstractContextManager:
    """What a model's forward runs in for model.dtype `dtype`: bf16 autocast for bf16-mixed (its matmuls in bf16,
    weights and the log-softmax that follows in float32), nothing for the others, whose weights set the dtype."""
    if dtype == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def pad_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    side: str = "right",
) -> dict[str, torch.Tensor]:
    """Concatenate prompt+completion per row and pad with pad_id to the longest row's length L, after the
    tokens (side="right") or before them (side="left", as generation wants).

    Returns input_ids, attention_mask and completion_mask, each (N, L) int64; completion_mask is 1 exactly at the
    completion tokens, so prompt and padding never count.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    completion_mask = torch.zeros((n, length), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        start = 0 if side == "right" else length - len(seq)
        input_ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, start : start + len(seq)] = 1
        completion_mask[row, start + len(p) : start + len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _needs_full_logits(model: torch.nn.Module) -> bool:
    # Models that rescale or soft-cap logits after the LM head would be scored wrongly by the head-only path.
    cfg = model.config
    return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


def selective_log_softmax(
    hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log softmax(lm_head(hidden))[target] for each row; hidden (T, H), targets (T,) -> (T,) fp32.

    Rows are processed in chunks so the fp32 (chunk, vocab) logits are the largest temporary.
    """
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = lm_head(hidden[start : start + chunk_size]).float()
        tgt = targets[start : start + chunk_size]
        picked = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token | prefix) over completion tokens; inputs (N, L) as `pad_batch` makes them ->
    (sums (N,) fp32, counts (N,) of the tokens summed). A token at position 0 has no prefix and is not scored.

    Position ids follow the attention mask, so left- and right-padded batches give the same sums. Models that
    rescale or soft-cap their logits get the full logits; others only the LM head at the scored positions.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # Token t is predicted from the hidden state at t-1.
    target_mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:][target_mask]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    if _needs_full_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        picked = logits[:, :-1][target_mask].float()
        token_logps = picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    else:
        hidden = model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        token_logps = selective_log_softmax(hidden[:, :-1][target_mask], model.get_output_embeddings(), targets,
                                            chunk_size)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, rows, token_logps)
    return sums, target_mask.sum(-1)


def shared_prompt_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """The batch of `shared_prompt_logps`: each prompt once, left-padded, as prompt_ids and prompt_mask (B, Lp),
    and its k completions (every prompt the same k) right-padded, prompt after prompt, as completion_ids and
    completion_mask (B*k, Lc)."""
    ks = {len(group) for group in completions}
    if len(ks) != 1 or len(completions) != len(prompts):
        raise ValueError("every prompt needs the same number of completions")
    prompt = pad_batch(prompts, [[] for _ in prompts], pad_id, side="left")
    flat = [c for group in completions for c in group]
    completion = pad_batch([[] for _ in flat], flat, pad_id, side="right")
    return {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
            "completion_ids": completion["input_ids"], "completion_mask": completion["completion_mask"]}


def prompt_attention_mask(prompt_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lp) left-padded prompt mask -> (B, 1, Lp, Lp) additive causal mask of `dtype` (0 where a position may
    attend, the dtype's minimum elsewhere) in which each padding position attends to itself alone, and no real
    position attends to padding.

    With the plain 2-D mask a left-padding position attends to nothing. CUDA's attention kernels (seen with sdpa on
    an H200, torch 2.11) then give NaN gradients for such a row; its output reaches no loss term, but 0 x NaN in
    the backward makes every weight gradient NaN. On the CPU the same rows are finite, which hid this.
    """
    length, device = prompt_mask.shape[1], prompt_mask.device
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril() & prompt_mask.bool()[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def shared_prompt_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `completion_logps`, but the prompt is run once and its KV cache reused by its k completions.

    prompt_ids/mask (B, Lp), completion_ids/mask (B*k, Lc) as `shared_prompt_batch` makes them -> (sums (B*k,)
    fp32, counts (B*k,) of the completion tokens, the first one predicted from the prompt's last position). Chosen
    and rejected share their prompt, so a pair costs prompt + 2 completions instead of 2 x (prompt + completion).
    Prompts with padding run with the 4-D mask of `prompt_attention_mask`. Models that rescale or soft-cap their
    logits, and models training with gradient checkpointing (which turns the KV cache off), are scored by
    `completion_logps` on each prompt+completion instead, without the shared cache.
    """
    if _needs_full_logits(model) or (model.training and getattr(model, "is_gradient_checkpointing", False)):
        prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        k = completion_ids.shape[0] // len(prompts)
        completions = [row[mask.bool()].tolist() for row, mask in zip(completion_ids, completion_mask)]
        batch = pad_batch([p for p in prompts for _ in range(k)], completions, 0)
        return completion_logps(model, **{name: t.to(prompt_ids.device) for name, t in batch.items()},
                                chunk_size=chunk_size)
    b, k = prompt_ids.shape[0], completion_ids.shape[0] // prompt_ids.shape[0]
    decoder = model.get_decoder()
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    # Without padding the plain mask lets attention take its causal fast path.
    attention = prompt_mask if bool(prompt_mask.all()) else prompt_attention_mask(prompt_mask, model.dtype)
    out = decoder(input_ids=prompt_ids, attention_mask=attention, position_ids=prompt_positions, use_cache=True)
    cache, last = out.past_key_values, out.last_hidden_state[:, -1]
    if k > 1:
        cache.batch_repeat_interleave(k)
        last = last.repeat_interleave(k, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
    positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(completion_ids.shape[1], device=prompt_ids.device)
    hidden = decoder(
        input_ids=completion_ids, attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        position_ids=positions, past_key_values=cache, use_cache=True,
    ).last_hidden_state
    # Completion token t is predicted from the state before it: the prompt's last state for t = 0.
    predictors = torch.cat([last.unsqueeze(1), hidden[:, :-1]], dim=1)
    mask = completion_mask.bool()
    token_logps = selective_log_softmax(predictors[mask], model.get_output_embeddings(), completion_ids[mask],
                                        chunk_size)
    rows = torch.arange(b * k, device=prompt_ids.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(b * k, dtype=torch.float32, device=prompt_ids.device).index_add(0, rows, token_logps)
    return sums, mask.sum(-1)


class SequenceScorer(torch.nn.Module):
    """The policy as one module whose forward takes the tensors of `shared_prompt_batch` and returns what
    `shared_prompt_logps` does: summed completion log-probs and their token counts.

    Wrapping DDP or DeepSpeed around this (not around the bare LM) keeps gradient synchronisation and ZeRO
    parameter gathering on the path that actually computes the loss.
    """

    def __init__(self, lm: torch.nn.Module, dtype: str = "float32"):
        super().__init__()
        self.lm = lm
        self.dtype = dtype  # model.dtype: bf16-mixed runs the forward under bf16 autocast

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with precision(self.dtype, batch["prompt_ids"].device):
            return shared_prompt_logps(self.lm, **batch)
