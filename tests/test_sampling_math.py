"""The transformers sampling loop's pure parts: top-p filter, per-sample seeds, and sample_tokens itself."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_ray.logprobs import shared_prompt_batch, shared_prompt_logps
from dpo_ray.sampling import draw_tokens, filter_top_p, sample_seed, sample_tokens

from conftest import PAD_ID

NO_EOS: set[int] = set()


# ------------------------------------------------------------------------------------------------- top-p


def logits_of(probs):
    return torch.tensor([[math.log(p) for p in row] for row in probs])


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.3, {1}),  # the top token alone already reaches 0.3
        (0.7, {1, 2}),  # 0.45 < 0.7 <= 0.45 + 0.3
        (0.76, {1, 2, 3}),
        (0.999, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_mass(top_p, kept):
    logits = logits_of([[0.05, 0.45, 0.3, 0.2]])
    out = filter_top_p(logits, top_p)
    survivors = {i for i in range(4) if math.isfinite(out[0, i].item())}
    assert survivors == kept
    for i in kept:  # survivors keep their logits unchanged
        assert out[0, i].item() == logits[0, i].item()


def test_top_p_per_row():
    logits = logits_of([[0.05, 0.45, 0.3, 0.2], [0.6, 0.1, 0.1, 0.2]])
    out = filter_top_p(logits, 0.7)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [True, False, False, True]]


def test_top_p_one_is_identity():
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    assert torch.equal(filter_top_p(logits, 1.0), logits)


def test_top_p_first_token_always_survives():
    logits = logits_of([[0.25, 0.25, 0.25, 0.25]])
    out = filter_top_p(logits, 1e-9)
    assert torch.isfinite(out).sum().item() == 1


# ------------------------------------------------------------------------------------------------ seeds


def test_sample_seed_deterministic_and_distinct():
    assert sample_seed(0, "p1", 0) == sample_seed(0, "p1", 0)
    seeds = {sample_seed(s, p, i) for s in (0, 1) for p in ("p1", "p2", "p10") for i in range(4)}
    assert len(seeds) == 2 * 3 * 4
    assert sample_seed(0, "p1", 1) != sample_seed(0, "p11", 0)  # no "p1"+"1" vs "p11"+"" collision
    for s in seeds:
        assert 0 <= s < 2**63


# ------------------------------------------------------------------------------------------- draw_tokens


def test_draw_tokens_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    draws = 20000
    generators = [torch.Generator().manual_seed(i) for i in range(draws)]
    tokens = draw_tokens(probs.expand(draws, -1), generators)
    freq = torch.bincount(tokens, minlength=5).float() / draws
    # Binomial standard error at p=0.5 and 20000 draws is 0.0035; 0.015 is over 4 of them.
    assert torch.allclose(freq, probs, atol=0.015), freq
    assert freq[1] == 0 and freq[4] == 0


def test_draw_tokens_never_picks_zero_mass_even_at_the_cdf_end():
    probs = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 64)
    tokens = draw_tokens(probs, [torch.Generator().manual_seed(i) for i in range(64)])
    assert tokens.tolist() == [1] * 64


def test_draw_tokens_row_depends_only_on_its_generator():
    probs = torch.rand(3, 100).softmax(-1)
    alone = draw_tokens(probs[1:2], [torch.Generator().manual_seed(7)])
    batched = draw_tokens(probs, [torch.Generator().manual_seed(s) for s in (1, 7, 3)])
    assert batched[1] == alone[0]


# ----------------------------------------------------------------------------------------- sample_tokens

SHORT = [5, 6, 7]
LONG = [8, 9, 10, 11, 12, 13, 14]


def run(model, prompts, seeds, max_new=6, temperature=1.0, top_p=1.0, eos=NO_EOS, n=1):
    return sample_tokens(model, prompts, seeds, n=n, max_new_tokens=max_new, temperature=temperature,
                         top_p=top_p, eos_ids=eos, pad_id=PAD_ID)


def raw_logp(model, prompt, completion):
    """Sum of untempered log-softmax of the completion tokens, one unpadded forward pass."""
    with torch.no_grad():
        logp = model(torch.tensor([prompt + completion])).logits[0].float().log_softmax(-1)
    return sum(logp[len(prompt) + i - 1, t].item() for i, t in enumerate(completion))


def greedy(model, prompt, steps):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_deterministic_for_fixed_seeds(llama):
    a = run(llama, [SHORT, LONG], [11, 22])
    b = run(llama, [SHORT, LONG], [11, 22])
    assert a == b
    c = run(llama, [SHORT, LONG], [12, 22])
    assert c[0][0] != a[0][0]  # another seed, another sample
    assert c[1] == a[1]


def test_independent_of_batch_composition(llama):
    short_alone = run(llama, [SHORT], [11])[0]
    long_alone = run(llama, [LONG], [22])[0]
    batched = run(llama, [LONG, SHORT], [22, 11])
    assert batched[1][0] == short_alone[0]  # left-padded beside a longer prompt
    assert batched[0][0] == long_alone[0]
    assert batched[1][1] == pytest.approx(short_alone[1], abs=1e-4)
    assert batched[0][1] == pytest.approx(long_alone[1], abs=1e-4)


def test_temperature_zero_is_argmax(llama):
    out = run(llama, [SHORT, LONG], [1, 2], max_new=5, temperature=0.0)
    for (ids, _, finish), prompt in zip(out, [SHORT, LONG]):
        assert ids == greedy(llama, prompt, 5)
        assert finish == "length"


def test_tiny_top_p_is_argmax(llama):
    out = run(llama, [SHORT], [3], max_new=5, temperature=1.0, top_p=1e-6)
    assert out[0][0] == greedy(llama, SHORT, 5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 1.0), (0.0, 1.0)])
def test_logp_is_raw_logsoftmax_of_sampled_tokens(llama, temperature, top_p):
    prompts = [SHORT, LONG, [30]]
    out = run(llama, prompts, [5, 6, 7], max_new=6, temperature=temperature, top_p=top_p)
    for prompt, (ids, logp, finish) in zip(prompts, out):
        assert len(ids) == 6 and finish == "length"
        assert logp == pytest.approx(raw_logp(llama, prompt, ids), abs=1e-3)


def test_logp_equals_what_the_scorer_computes(llama):
    # evaluate reuses sample_logp in place of a scoring pass of the sampling model (fp32, transformers backend).
    prompts = [SHORT, LONG, [30]]
    out = run(llama, prompts, [5, 6, 7, 8, 9, 10], max_new=6, n=2)
    batch = shared_prompt_batch(prompts, [[ids for ids, _, _ in out[2 * i : 2 * i + 2]] for i in range(3)], PAD_ID)
    with torch.no_grad():
        scored, _ = shared_prompt_logps(llama, **batch)
    assert [logp for _, logp, _ in out] == pytest.approx(scored.tolist(), abs=1e-4)


def test_eos_stops_one_row_and_not_the_other(llama):
    short_greedy = greedy(llama, SHORT, 6)
    long_greedy = greedy(llama, LONG, 6)
    eos = short_greedy[2]
    assert eos not in short_greedy[:2] and eos not in long_greedy, "pick another prompt for this model"
    out = run(llama, [SHORT, LONG], [1, 2], max_new=6, temperature=0.0, eos={eos})
    (s_ids, s_logp, s_finish), (l_ids, l_logp, l_finish) = out
    assert s_ids == short_greedy[:3] and s_ids[-1] == eos and s_finish == "stop"
    assert l_ids == long_greedy and l_finish == "length"
    assert s_logp == pytest.approx(raw_logp(llama, SHORT, s_ids), abs=1e-3)
    assert l_logp == pytest.approx(raw_logp(llama, LONG, l_ids), abs=1e-3)


def test_n_samples_per_prompt_match_single_rows(llama):
    # n > 1 prefills each prompt once and repeats its KV cache: every output row must equal the same prompt and
    # seed sampled on its own, and rows come out prompt-major.
    seeds = [101, 102, 103, 201, 202, 203]
    out = run(llama, [SHORT, LONG], seeds, max_new=6, n=3)
    assert len(out) == 6
    for k, (prompt, seed) in enumerate(zip([SHORT] * 3 + [LONG] * 3, seeds)):
        alone = run(llama, [prompt], [seed], max_new=6)[0]
        assert out[k][0] == alone[0], k
        assert out[k][1] == pytest.approx(alone[1], abs=1e-4)
        assert out[k][1] == pytest.approx(raw_logp(llama, prompt, out[k][0]), abs=1e-3)
    assert len({tuple(ids) for ids, _, _ in out[:3]}) > 1  # distinct seeds give distinct samples


def test_n_samples_with_eos(llama):
    short_greedy = greedy(llama, SHORT, 6)
    eos = short_greedy[1]
    assert eos != short_greedy[0]
    out = run(llama, [SHORT, LONG], [1, 2, 3, 4], max_new=6, temperature=0.0, eos={eos}, n=2)
    assert [ids for ids, _, _ in out[:2]] == [short_greedy[:2]] * 2
    assert [finish for _, _, finish in out[:2]] == ["stop", "stop"]
    long_alone = run(llama, [LONG], [3], max_new=6, temperature=0.0, eos={eos})[0]
    assert out[2] == out[3]
    assert out[2][0] == long_alone[0] and out[2][2] == long_alone[2]


def test_seed_count_must_match_rows(llama):
    with pytest.raises(ValueError):
        run(llama, [SHORT, LONG], [1, 2], n=2)
