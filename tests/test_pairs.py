"""build_pairs and PairStats."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from dpo_ray.pairs import PairStats, build_pairs


def test_best_vs_worst_picks_max_and_min():
    texts = ["a", "b", "c", "d"]
    scores = [0.2, 0.9, -0.4, 0.1]
    pairs, stats = build_pairs(texts, scores)
    assert pairs == [(1, 2)]
    assert stats.pairs == 1 and stats.prompts == 1 and stats.completions == 4
    assert stats.prompts_without_pair == 0
    assert stats.ties_dropped == stats.identical_dropped == stats.below_margin_dropped == 0


def test_best_vs_worst_order_independent_of_position():
    pairs, _ = build_pairs(["a", "b", "c"], [-3.0, 1.0, 5.0])
    assert pairs == [(2, 0)]


def test_all_equal_scores_are_a_tie():
    pairs, stats = build_pairs(["a", "b", "c"], [0.5, 0.5, 0.5])
    assert pairs == []
    assert stats.ties_dropped == 1
    assert stats.pairs == 0 and stats.prompts_without_pair == 1


def test_identical_texts_collapse_to_first():
    # "x" at index 2 duplicates index 0 and would otherwise be the best.
    pairs, stats = build_pairs(["x", "y", "x"], [0.1, 0.0, 5.0])
    assert stats.identical_dropped == 1
    assert pairs == [(0, 1)]


def test_two_identical_completions_alone_give_no_pair():
    pairs, stats = build_pairs(["same", "same"], [1.0, -1.0])
    assert pairs == []
    assert stats.identical_dropped == 1
    assert stats.prompts_without_pair == 1
    assert stats.ties_dropped == 0


def test_min_margin_drops_and_counts():
    pairs, stats = build_pairs(["a", "b"], [0.3, 0.1], min_margin=0.5)
    assert pairs == []
    assert stats.below_margin_dropped == 1 and stats.ties_dropped == 0
    assert stats.prompts_without_pair == 1
    pairs, stats = build_pairs(["a", "b"], [0.3, -0.2], min_margin=0.5)
    assert pairs == [(0, 1)]  # a gap of exactly min_margin is enough
    assert stats.below_margin_dropped == 0


def test_all_pairs_every_distinct_pair_chosen_higher():
    texts = ["a", "b", "c", "d"]
    scores = [0.0, 3.0, 1.0, 2.0]
    pairs, stats = build_pairs(texts, scores, mode="all_pairs")
    assert len(pairs) == 6
    assert {frozenset(p) for p in pairs} == {frozenset((i, j)) for i in range(4) for j in range(i + 1, 4)}
    for chosen, rejected in pairs:
        assert scores[chosen] > scores[rejected]
    assert stats.pairs == 6


def test_all_pairs_respects_min_margin_ties_and_duplicates():
    texts = ["a", "b", "c", "d", "a"]
    scores = [0.0, 3.0, 2.5, 0.0, 9.0]
    pairs, stats = build_pairs(texts, scores, mode="all_pairs", min_margin=1.0)
    # Kept: a(0)=0, b(1)=3, c(2)=2.5, d(3)=0; candidate gaps: b-a 3, c-a 2.5, a-d 0 (tie), b-c 0.5, b-d 3, c-d 2.5
    assert sorted(pairs) == sorted([(1, 0), (2, 0), (1, 3), (2, 3)])
    assert stats.identical_dropped == 1
    assert stats.ties_dropped == 1
    assert stats.below_margin_dropped == 1
    assert stats.pairs == 4


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_scores_excluded(bad):
    pairs, stats = build_pairs(["a", "b", "c"], [0.5, bad, -0.5])
    assert stats.nonfinite_scores == 1
    assert pairs == [(0, 2)]
    pairs, stats = build_pairs(["a", "b", "c"], [math.nan, bad, 1.0], mode="all_pairs")
    assert stats.nonfinite_scores == 2
    assert pairs == [] and stats.prompts_without_pair == 1


def test_pairstats_add_sums_every_field():
    names = [f.name for f in fields(PairStats)]
    a = PairStats(**{n: i + 1 for i, n in enumerate(names)})
    b = PairStats(**{n: 10 * (i + 1) for i, n in enumerate(names)})
    a.add(b)
    assert a.as_dict() == {n: 11 * (i + 1) for i, n in enumerate(names)}
    assert b.as_dict() == {n: 10 * (i + 1) for i, n in enumerate(names)}


def test_pairstats_add_accumulates_build_results():
    total = PairStats()
    for texts, scores in ((["a", "b"], [1.0, 0.0]), (["a", "a"], [1.0, 1.0]), (["a", "b"], [2.0, 2.0])):
        total.add(build_pairs(texts, scores)[1])
    assert total.prompts == 3 and total.completions == 6 and total.pairs == 1
    assert total.identical_dropped == 1 and total.ties_dropped == 1 and total.prompts_without_pair == 2


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="pairing mode"):
        build_pairs(["a", "b"], [1.0, 0.0], mode="round_robin")


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        build_pairs(["a", "b"], [1.0])


def test_filter_drops_pairs_the_external_score_contradicts():
    # The labeler prefers b over a; the filter (external reward) prefers a: the pair is dropped and counted.
    pairs, stats = build_pairs(["a", "b"], [0.1, 0.9], filter_scores=[0.5, -0.5])
    assert pairs == [] and stats.filter_disagreed == 1 and stats.prompts_without_pair == 1
    # A filter tie does not contradict at the default margin 0, but fails a positive margin.
    pairs, stats = build_pairs(["a", "b"], [0.1, 0.9], filter_scores=[0.0, 0.0])
    assert pairs == [(1, 0)] and stats.filter_disagreed == 0
    pairs, stats = build_pairs(["a", "b"], [0.1, 0.9], filter_scores=[0.0, 0.0], filter_min_margin=0.1)
    assert pairs == [] and stats.filter_disagreed == 1


def test_filter_keeps_agreeing_pairs_and_checks_each_candidate():
    texts, scores = ["a", "b", "c"], [0.0, 1.0, 2.0]
    # Filter agrees on c > a and c > b but contradicts b > a.
    pairs, stats = build_pairs(texts, scores, "all_pairs", filter_scores=[0.5, 0.0, 1.0])
    assert sorted(pairs) == [(2, 0), (2, 1)]
    assert stats.filter_disagreed == 1 and stats.pairs == 2


def test_fluency_guard_drops_a_chosen_less_fluent_than_its_rejected():
    texts, scores = ["a", "b", "c"], [0.0, 1.0, 2.0]
    # Per-token log-probs: c (the labeler's best) is the least fluent, 0.5 nats a token below a, 0.2 below b.
    fluency = [-2.0, -2.3, -2.5]
    pairs, stats = build_pairs(texts, scores, fluency=fluency)
    assert pairs == [] and stats.fluency_guard_dropped == 1 and stats.prompts_without_pair == 1
    pairs, stats = build_pairs(texts, scores, fluency=fluency, max_fluency_drop=0.5)
    assert pairs == [(2, 0)] and stats.fluency_guard_dropped == 0
    pairs, stats = build_pairs(texts, scores, "all_pairs", fluency=fluency, max_fluency_drop=0.35)
    assert sorted(pairs) == [(1, 0), (2, 1)] and stats.fluency_guard_dropped == 1 and stats.pairs == 2
    # Equal fluency passes at drop 0; a NaN never passes; the guard runs after the filter, which counts first.
    assert build_pairs(["a", "b"], [0.0, 1.0], fluency=[-2.0, -2.0])[0] == [(1, 0)]
    assert build_pairs(["a", "b"], [0.0, 1.0], fluency=[-2.0, math.nan])[1].fluency_guard_dropped == 1
    _, stats = build_pairs(["a", "b"], [0.0, 1.0], filter_scores=[1.0, 0.0], fluency=[0.0, -9.0])
    assert stats.filter_disagreed == 1 and stats.fluency_guard_dropped == 0
    with pytest.raises(ValueError, match="2 scores but 1 fluency values"):
        build_pairs(["a", "b"], [0.0, 1.0], fluency=[-2.0])


def test_nonfinite_filter_score_removes_the_completion_and_lengths_must_match():
    pairs, stats = build_pairs(["a", "b", "c"], [0.0, 1.0, 2.0], filter_scores=[0.0, 1.0, math.nan])
    assert pairs == [(1, 0)] and stats.nonfinite_scores == 1
    with pytest.raises(ValueError, match="3 scores but 2 filter scores"):
        build_pairs(["a", "b", "c"], [0.0, 1.0, 2.0], filter_scores=[0.0, 1.0])
