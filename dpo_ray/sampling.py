"""The transformers sampling loop: n completions per prompt from a causal LM with a KV cache, seeded per row.

Pure torch, no Ray: the sample stage's actors call it (dpo_ray/stages/sample.py), and so does the GPU check
(benchmarks/gpu_check.py), which runs where Ray cannot be installed.
"""

from __future__ import annotations

import hashlib

import torch

from dpo_ray.logprobs import pad_batch


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw_tokens(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs (rows, vocab) by inverse CDF, row i's uniform drawn from generators[i].

    One uniform per row keeps a row's draw independent of its batch, like a per-row torch.multinomial, which
    however draws a vocab-sized exponential vector per row: 30x slower here, 14% of a decode step.
    """
    # Drawn on the CPU, whatever the model's device: a seed gives the same uniforms on any machine.
    uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device, probs.dtype)
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can put the target at the very end of the CDF; the last token of nonzero mass is the right one.
    last_nonzero = (probs > 0).cumsum(-1).argmax(-1)
    return torch.minimum(token, last_nonzero)


@torch.inference_mode()
def sample_tokens(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    pad_id: int,
) -> list[tuple[list[int], float, str]]:
    """n completions per prompt: [(token ids ending at EOS if any, sum log-prob, finish reason)], prompt-major.

    Each prompt is prefilled once and its KV cache repeated n times (prefill is half the work at our lengths).
    `seeds` holds one seed per output row (len(prompts) * n), so a row's tokens do not depend on its batch.
    """
    device = next(model.parameters()).device
    cache, logits, attention, next_position = _prefill(model, prompts, n, pad_id, device)
    rows = len(prompts) * n
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    hit_eos = torch.zeros(rows, dtype=torch.bool, device=device)
    logp = torch.zeros(rows, dtype=torch.float64, device=device)
    steps = []
    for _ in range(max_new_tokens):
        logits = logits.float()
        token = _next_token(logits, temperature, top_p, generators)
        logp += torch.where(done, 0.0, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1).double())
        token = torch.where(done, pad_id, token)
        steps.append(token)
        newly_done = torch.isin(token, eos) & ~done
        hit_eos |= newly_done
        done |= newly_done
        if done.all():
            break
        attention = torch.cat([attention, attention.new_ones(rows, 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_position = next_position + 1
    return _finished_rows(torch.stack(steps, dim=1).tolist(), hit_eos.tolist(), logp.tolist(), eos_ids)


def _prefill(model, prompts: list[list[int]], n: int, pad_id: int, device: torch.device):
    """Run the left-padded prompts once; return the KV cache, last logits, attention mask and next position ids,
    each repeated n times per prompt (rows prompt-major)."""
    batch = {k: t.to(device) for k, t in pad_batch(prompts, [[] for _ in prompts], pad_id, side="left").items()}
    attention = batch["attention_mask"]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=batch["input_ids"], attention_mask=attention, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if n > 1:
        cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    attention = attention.repeat_interleave(n, dim=0)
    next_position = positions[:, -1:].repeat_interleave(n, dim=0) + 1
    return cache, logits, attention, next_position


def _next_token(logits: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row (rows, vocab): the argmax at temperature 0, else drawn from the tempered top-p
    distribution with each row's generator."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw_tokens(filter_top_p(logits / temperature, top_p).softmax(-1), generators)


def _finished_rows(tokens: list[list[int]], hit_eos: list[bool], logp: list[float],
                   eos_ids: set[int]) -> list[tuple[list[int], float, str]]:
    """(tokens up to and including the first EOS, sum log-prob, "stop") for a row that reached EOS, else
    (all its tokens, sum log-prob, "length")."""
    results = []
    for ids, stopped, row_logp in zip(tokens, hit_eos, logp):
        if stopped:
            first_eos = next(i for i, t in enumerate(ids) if t in eos_ids)
            ids = ids[: first_eos + 1]
        results.append((ids, float(row_logp), "stop" if stopped else "length"))
    return results
