"""completion_logps / shared_prompt_logps / pad_batch / selective_log_softmax on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from dpo_ray.logprobs import (
    SequenceScorer,
    completion_logps,
    pad_batch,
    prompt_attention_mask,
    selective_log_softmax,
    shared_prompt_batch,
    shared_prompt_logps,
)

from conftest import PAD_ID, VOCAB

# Different prompt and completion lengths, including a one-token completion and a one-token prompt.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [60, 61, 62, 63]]
COMPLETIONS = [[20, 21, 22, 23], [30], [40, 41], [70, 71, 72, 73, 74]]


def slow_reference(model, prompts, completions):
    """Per sequence, no padding: full log_softmax summed over completion positions only."""
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c])
            logp = model(ids).logits.float().log_softmax(-1)[0]
            out.append(sum(logp[len(p) + i - 1, tok].item() for i, tok in enumerate(c)))
    return torch.tensor(out)


def score(model, prompts=PROMPTS, completions=COMPLETIONS, pad_id=PAD_ID, side="right", **kw):
    with torch.no_grad():
        return completion_logps(model, **pad_batch(prompts, completions, pad_id, side=side), **kw)


def test_pad_batch_layout():
    b = pad_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=9)
    assert b["input_ids"].tolist() == [[1, 2, 4, 9], [3, 5, 6, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    left = pad_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=9, side="left")
    assert left["input_ids"].tolist() == [[9, 1, 2, 4], [3, 5, 6, 7]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert left["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    with pytest.raises(ValueError):
        pad_batch([[1]], [[2], [3]], pad_id=0)


def test_matches_unpadded_slow_reference(llama):
    sums, counts = score(llama)
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, slow_reference(llama, PROMPTS, COMPLETIONS), atol=1e-4, rtol=0)
    assert (sums < 0).all()


def test_left_and_right_padding_agree(llama):
    right, right_counts = score(llama, side="right")
    left, left_counts = score(llama, side="left")
    torch.testing.assert_close(left, right, atol=1e-4, rtol=0)
    assert left_counts.tolist() == right_counts.tolist()


def test_counts_are_completion_lengths(llama):
    _, counts = score(llama)
    assert counts.tolist() == [len(c) for c in COMPLETIONS]
    _, counts = score(llama, side="left")
    assert counts.tolist() == [len(c) for c in COMPLETIONS]


def test_prompt_tokens_count_only_through_conditioning(llama):
    base, counts = score(llama)
    changed_prompts = [list(p) for p in PROMPTS]
    changed_prompts[1][0] = 90  # first prompt token of row 1: not itself scored
    changed, changed_counts = score(llama, prompts=changed_prompts)
    assert changed_counts.tolist() == counts.tolist()
    # Only row 1 changes, and exactly as the unpadded reference of the new prompt says.
    torch.testing.assert_close(changed[[0, 2, 3]], base[[0, 2, 3]], atol=1e-5, rtol=0)
    assert abs(changed[1] - base[1]) > 1e-4
    torch.testing.assert_close(changed, slow_reference(llama, changed_prompts, COMPLETIONS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_id_does_not_matter(llama, side):
    a, _ = score(llama, pad_id=PAD_ID, side=side)
    b, _ = score(llama, pad_id=55, side=side)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_row_does_not_depend_on_batch_neighbours(llama):
    alone, _ = score(llama, prompts=PROMPTS[2:3], completions=COMPLETIONS[2:3])
    batched, _ = score(llama)
    torch.testing.assert_close(batched[2:3], alone, atol=1e-5, rtol=0)


def test_chunk_size_does_not_matter(llama):
    a, _ = score(llama, chunk_size=1024)
    b, _ = score(llama, chunk_size=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_full_logits_path_agrees(llama, monkeypatch):
    # A config with logit_scale routes through the full-logits path; Llama ignores the attribute, so both
    # paths must give the same numbers.
    head_only, counts = score(llama)
    monkeypatch.setattr(llama.config, "logit_scale", 1.0, raising=False)
    full, full_counts = score(llama)
    torch.testing.assert_close(full, head_only, atol=1e-4, rtol=0)
    assert full_counts.tolist() == counts.tolist()


def test_selective_log_softmax_chunks_equal_full(llama):
    torch.manual_seed(1)
    hidden = torch.randn(7, llama.config.hidden_size)
    targets = torch.tensor([0, 3, 96, 50, 2, 2, 11])
    head = llama.get_output_embeddings()
    with torch.no_grad():
        expected = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        got = selective_log_softmax(hidden, head, targets, chunk_size=3)
    assert got.shape == (7,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    empty = selective_log_softmax(hidden[:0], head, targets[:0], chunk_size=3)
    assert empty.shape == (0,)


def test_shared_prompt_batch_layout():
    b = shared_prompt_batch([[5, 6], [7, 8, 9]], [[[10, 11], [13]], [[12], [14, 15, 16]]], pad_id=0)
    assert b["prompt_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert b["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    # k completions per prompt, in prompt order: chosen then rejected for a pair.
    assert b["completion_ids"].tolist() == [[10, 11, 0], [13, 0, 0], [12, 0, 0], [14, 15, 16]]
    assert b["completion_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError):
        shared_prompt_batch([[1], [2]], [[[3], [4]], [[5]]], pad_id=0)


def test_prompt_attention_mask_leaves_no_row_fully_masked():
    # Prompts [_, _, 5, 6] and [7, 8, 9, 10]: padding positions see themselves alone, real ones see the real
    # positions up to themselves (a fully masked row gave NaN gradients on CUDA, benchmarks/README.md).
    mask = prompt_attention_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), torch.float32)
    assert mask.shape == (2, 1, 4, 4)
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert allowed[1] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert mask.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_prompt_matches_slow_reference(llama, k):
    groups = [[COMPLETIONS[(i + j) % len(COMPLETIONS)] for j in range(k)] for i in range(len(PROMPTS))]
    with torch.no_grad():
        sums, counts = shared_prompt_logps(llama, **shared_prompt_batch(PROMPTS, groups, PAD_ID))
    flat_prompts = [p for p in PROMPTS for _ in range(k)]
    flat = [c for g in groups for c in g]
    torch.testing.assert_close(sums, slow_reference(llama, flat_prompts, flat), atol=1e-4, rtol=0)
    assert counts.tolist() == [len(c) for c in flat]


def test_sequence_scorer_gradients_are_finite_and_match(llama):
    groups = [[COMPLETIONS[i], COMPLETIONS[-1 - i]] for i in range(len(PROMPTS))]
    batch = shared_prompt_batch(PROMPTS, groups, PAD_ID)
    llama.zero_grad(set_to_none=True)
    sums, _ = SequenceScorer(llama)(**batch)
    sums.sum().backward()
    shared = {n: p.grad.clone() for n, p in llama.named_parameters()}
    llama.zero_grad(set_to_none=True)
    flat_prompts = [p for p in PROMPTS for _ in range(2)]
    completion_logps(llama, **pad_batch(flat_prompts, [c for g in groups for c in g], PAD_ID))[0].sum().backward()
    for name, p in llama.named_parameters():
        assert torch.isfinite(shared[name]).all(), name
        torch.testing.assert_close(shared[name], p.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gradient_flows_to_lm_head(llama, side):
    llama.zero_grad(set_to_none=True)
    sums, _ = completion_logps(llama, **pad_batch(PROMPTS, COMPLETIONS, PAD_ID, side=side))
    assert sums.requires_grad
    sums.sum().backward()
    grad = llama.get_output_embeddings().weight.grad
    assert grad is not None and grad.shape == (VOCAB, llama.config.hidden_size)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    for name, p in llama.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_gradient_checkpointing_gives_the_same_sums_and_gradients(llama):
    """train.gradient_checkpointing: in training mode HF turns the KV cache off, so the scorer runs each
    prompt+completion whole; sums and gradients equal those of the shared-prompt path without checkpointing."""
    groups = [[COMPLETIONS[i], COMPLETIONS[-1 - i]] for i in range(len(PROMPTS))]
    batch = shared_prompt_batch(PROMPTS, groups, PAD_ID)

    def sums_and_grads():
        llama.zero_grad(set_to_none=True)
        sums, counts = SequenceScorer(llama)(**batch)
        sums.sum().backward()
        return sums.detach(), counts, {n: p.grad.clone() for n, p in llama.named_parameters()}

    llama.train()
    try:
        plain = sums_and_grads()
        llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointed = sums_and_grads()
    finally:
        llama.gradient_checkpointing_disable()
        llama.eval()
    torch.testing.assert_close(checkpointed[0], plain[0], atol=1e-4, rtol=0)
    assert checkpointed[1].tolist() == plain[1].tolist()
    for name, grad in plain[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, atol=1e-4, rtol=1e-3)


def test_bf16_mixed_runs_the_matmuls_in_bf16_and_keeps_weights_sums_and_gradients_float32(llama):
    """model.dtype=bf16-mixed: the scorer's forward under bf16 autocast. Its sums move from float32's by bf16's
    rounding (so the matmuls did run in bf16) and by little; the weights, sums and gradients stay float32."""
    groups = [[COMPLETIONS[i], COMPLETIONS[-1 - i]] for i in range(len(PROMPTS))]
    batch = shared_prompt_batch(PROMPTS, groups, PAD_ID)
    with torch.no_grad():
        exact, _ = SequenceScorer(llama)(**batch)
    mixed, counts = SequenceScorer(llama, "bf16-mixed")(**batch)
    assert mixed.dtype == torch.float32 and counts.tolist() == [len(c) for g in groups for c in g]
    gap = (mixed.detach() - exact).abs()
    # Measured on this model: 0.033 nats at most, on sums of -5.6 to -27 nats over 1-5 tokens.
    assert 0 < gap.max() < 0.05 * exact.abs().max(), gap
    mixed.sum().backward()
    grads = [p.grad for p in llama.parameters()]
    assert all(p.dtype == torch.float32 for p in llama.parameters())
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
