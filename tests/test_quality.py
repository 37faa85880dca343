"""dpo_ray.quality on hand-made text, with hand-computed values."""

from __future__ import annotations

import math

import pytest

from dpo_ray import quality as q

PROMPT = 'Write a movie review of "The Silent Echo", a war film, in two sentences.'


def test_tokens_strip_punctuation_and_lowercase():
    assert q.tokens("Great film, GREAT film!  ...  10/10 😍") == ["great", "film", "great", "film", "10/10", "😍"]
    assert q.tokens("“Wow,” she said — it’s (sort of) good.") == ["wow", "she", "said", "it's", "sort", "of", "good"]
    assert q.tokens("  ... !!! ") == []


def test_words_are_alphabetic_runs():
    assert q.words("Don't stop—it’s 2024! #InMyLife great🎉") == ["don't", "stop", "it's", "inmylife", "great"]


def test_distinct_n_pools_completions_without_crossing_them():
    # unigrams a b a b | a b: 2 distinct of 6; bigrams ab ba ab | ab: 2 distinct of 4.
    assert q.distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert q.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    # "b c" would span the two completions: not an n-gram.
    assert q.distinct_n(["a b", "c d"], 2) == 1.0
    assert q.distinct_n(["A, b.", "a B"], 2) == 0.5  # case and punctuation do not make n-grams distinct
    assert math.isnan(q.distinct_n(["one"], 2))


def test_repeated_ngram_share():
    # 3-grams abc bca cab abc: the two abc repeat.
    assert q.repeated_ngram_share("a b c a b c") == pytest.approx(2 / 4)
    assert q.repeated_ngram_share("great great great great") == 1.0
    assert q.repeated_ngram_share("the film was very good") == 0.0
    assert math.isnan(q.repeated_ngram_share("too short"))
    assert q.repeated_ngram_share("a b a b", n=2) == pytest.approx(2 / 3)


def test_non_dictionary_share():
    # words: i, beleive, the, movie, amazin (the emoji is no word): two misspelled of five.
    assert q.non_dictionary_share(["I beleive the movie", "amazin 😍"]) == pytest.approx(2 / 5)
    assert q.non_dictionary_share(["Don't miss it, it's a wonderful film"]) == 0.0
    assert math.isnan(q.non_dictionary_share(["😍 10/10"]))


def test_non_alpha_token_share():
    # tokens: 10/10, great🎉, film, 😍, well-made, don't ("..." is none): 10/10, great🎉 and 😍 are not words.
    assert q.non_alpha_token_share(["10/10 great🎉 film", "😍 well-made don't ..."]) == pytest.approx(3 / 6)
    assert q.non_alpha_token_share(["A fine film."]) == 0.0
    assert math.isnan(q.non_alpha_token_share([""]))


def test_title_words():
    assert q.title_words(PROMPT) == {"silent", "echo"}
    assert q.title_words("Review “The Paper Harbor” (1977).") == {"paper", "harbor"}
    assert q.title_words("Write a haiku about rain.") == set()


def test_on_task():
    words = q.MOVIE_REVIEW_WORDS
    assert q.on_task(PROMPT, "Thank you so much!!! 😍😍 Love you all", words) == (False, False)
    assert q.on_task(PROMPT, "Great scenes and a moving score.", words) == (True, False)  # plural of "scene"
    assert q.on_task(PROMPT, "The Silent Echo's ending stays with you.", words) == (True, True)
    assert q.on_task(PROMPT, "The Silent Echo is wonderful!", words) == (True, True)  # the title alone
    assert q.on_task(PROMPT, "A silent night, wonderful!", words) == (False, False)  # half the title is not it
    assert q.on_task(PROMPT, "The FILM's charm", words) == (True, False)
    # Another dataset's words; none: title mentions only.
    assert q.on_task("Give a recipe.", "Mix flour and Eggs.", ["egg"]) == (True, False)
    assert q.on_task(PROMPT, "Great film", []) == (False, False)
    assert q.on_task(PROMPT, "silent ECHO", []) == (True, True)


def test_mean_token_logp_skips_empty_completions():
    assert q.mean_token_logp([-10.0, -6.0, -3.0], [5, 2, 0]) == pytest.approx((-2.0 + -3.0) / 2)
    assert math.isnan(q.mean_token_logp([], []))


def test_text_quality_of_one_model():
    rows = [
        {"prompt": PROMPT, "completion": "The film was good. The film was good.", "completion_tokens": 10,
         "finish_reason": "stop", "logp": -20.0},
        {"prompt": PROMPT, "completion": "thx sooo much 😍", "completion_tokens": 4,
         "finish_reason": "length", "logp": -20.0},
        {"prompt": PROMPT, "completion": "The Silent Echo", "completion_tokens": 5, "finish_reason": None,
         "logp": -5.0},
    ]
    m = q.text_quality(rows, q.MOVIE_REVIEW_WORDS, fluency_column="logp")
    assert m["fluency"] == pytest.approx((-2.0 + -5.0 + -1.0) / 3)
    # tokens: the film was good the film was good | thx sooo much 😍 | the silent echo: 15, 10 distinct.
    assert m["distinct_1"] == pytest.approx(10 / 15)
    # bigrams 7 + 3 + 2 = 12: "the film", "film was", "was good" repeat in the first, 9 distinct.
    assert m["distinct_2"] == pytest.approx(9 / 12)
    # first: 3-grams tfw fwg wgt gtf tfw fwg -> 4 of 6 repeat; second: 2 3-grams, none; third: 1, none.
    assert m["repeated_3gram_share"] == pytest.approx((4 / 6 + 0 + 0) / 3)
    # words: 8 + 3 (thx, sooo, much) + 3; thx and sooo are not in the dictionary.
    assert m["non_dictionary_share"] == pytest.approx(2 / 14)
    assert m["non_alpha_token_share"] == pytest.approx(1 / 15)
    assert m["eos_share"] == pytest.approx(1 / 2)  # a missing finish_reason is not counted
    assert m["on_task_share"] == pytest.approx(2 / 3)
    assert m["title_mention_share"] == pytest.approx(1 / 3)


def test_text_quality_of_no_rows_is_nan():
    m = q.text_quality([], q.MOVIE_REVIEW_WORDS, fluency_column="logp")
    assert all(math.isnan(v) for v in m.values())


def test_divergence_on_a_scripted_sequence_of_rounds():
    """quality.divergence over three scripted rounds: round 1 is clean, round 2's training win rate rises while the
    audit's falls, round 3 also loses the text (on task and spelling past the 25% tolerance; fluency within it)."""
    from dpo_ray.quality import divergence

    initial = {"reference_fluency": -3.0, "reference_distinct_2": 0.85, "reference_on_task_share": 0.9,
               "reference_repeated_3gram_share": 0.0, "reference_non_dictionary_share": 0.04}
    text = {"policy_fluency": -3.2, "policy_distinct_2": 0.8, "policy_on_task_share": 0.85,
            "policy_repeated_3gram_share": 0.005, "policy_non_dictionary_share": 0.045}
    round_1 = {**initial, **text, "win_rate": 0.75, "audit_judge_win_rate": 0.65}
    round_2 = {**round_1, "win_rate": 0.9, "audit_judge_win_rate": 0.6}
    round_3 = {**round_2, "win_rate": 0.97, "audit_judge_win_rate": 0.62, "policy_fluency": -3.7,
               "policy_on_task_share": 0.6, "policy_non_dictionary_share": 0.08}
    assert divergence(round_1) == []
    assert divergence(round_2, round_1) == ["audit_judge_win_rate fell 65% -> 60% while win_rate rose 75% -> 90%"]
    # Against the initial model (win rate 0.5 for every labeler) round 2 is clean.
    assert divergence(round_2) == []
    flagged = divergence(round_3, round_2)
    assert [reason.split(" ")[0] for reason in flagged] == ["on_task_share", "non_dictionary_share"]
    # 0.08 is twice 0.04, still past 50%; on task lost a third of 0.9, within 50%.
    assert [r.split(" ")[0] for r in divergence(round_3, round_2, tolerance=0.5)] == ["non_dictionary_share"]
    # The noise floor: from a baseline of 0 repeated 3-grams, 0.005 is no divergence.
    assert divergence({**initial, "policy_repeated_3gram_share": 0.02}) == ["repeated_3gram_share 0.02 vs the "
                                                                            "baseline's 0: worse by more than 25%"]
