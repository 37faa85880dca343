"""Text quality of generated completions, apart from the reward (pure and Ray-free; evaluate reports it every round).

A policy can raise its reward while its text degenerates (iterative self-labeling does: by round 3 the default's
"reviews" are unpunctuated, misspelled gushing or emoji-laden thank-you notes). These measures watch for that, each
computed for one model's completions (evaluate prefixes them `policy_` / `reference_`):

- fluency: mean over completions of the baseline model's log-prob of the completion divided by its token count
  (nats per token, higher is more fluent by the baseline's judgement; `mean_token_logp`);
- distinct_1, distinct_2: distinct word n-grams over all word n-grams of the model's completions, pooled (n-grams
  never span two completions); low values mean the model says the same things again and again;
- repeated_3gram_share: within one completion, the share of its word 3-grams that occur more than once in it, averaged
  over the completions that have a 3-gram ("great great great great" -> 1.0);
- non_dictionary_share: words (alphabetic runs, inner apostrophes kept, lowercased) that pyspellchecker's English
  dictionary does not know, over all words, pooled: a spelling measure (names it does not know count too, alike for
  both models);
- non_alpha_token_share: tokens with a character that is not a letter, apostrophe, hyphen or inner period (digits,
  emoji, symbols: "10/10", "2024", "😍", "great🎉") over all tokens, pooled; these are not words for the spelling
  measure, and a token that is punctuation alone is no token;
- eos_share: completions that ended in EOS (finish_reason "stop") rather than at the token limit;
- on_task_share, title_mention_share: see `on_task`.

Tokens are whitespace-separated, lowercased, with punctuation stripped from both ends. A measure with nothing to
measure (no completions, no 3-grams, no words) is NaN.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from collections import Counter
from typing import Iterable, Sequence

# The default `evaluate.on_task_words`: words a movie review uses, for data/prompts/movie_reviews.jsonl. A word
# matches itself and its plural in s ("scene" matches "scenes"). Another dataset sets its own list in the config.
MOVIE_REVIEW_WORDS = (
    "film", "movie", "flick", "cinema", "cinematic", "cinematography", "plot", "story", "stories", "storyline",
    "storytelling", "script", "screenplay", "acting", "actor", "actress", "actresses", "cast", "casting", "director",
    "directed", "directing", "direction", "scene", "character", "performance", "role", "ending", "dialogue",
    "soundtrack", "visual", "pacing", "narrative", "genre", "sequel", "premise", "protagonist", "villain", "audience",
    "viewer", "comedy", "comedies", "drama", "thriller", "documentary", "animation", "animated", "review", "critic",
    "runtime",
)

# Title words that say nothing of the title ("The Silent Echo" is mentioned when "silent" and "echo" are).
_TITLE_STOPWORDS = frozenset("the a an of and in on at to for with from by or".split())
_STRIP = "\"'`.,;:!?()[]{}<>*_~#@/\\|-–—…“”‘’«»"
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_WORD_TOKEN = re.compile(r"[^\W\d_]+(?:['.-][^\W\d_]+)*")
_TITLE = re.compile(r"[\"“]([^\"“”]+)[\"”]")


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


def tokens(text: str) -> list[str]:
    """Whitespace-separated pieces, lowercased, punctuation stripped from both ends; empty pieces dropped."""
    stripped = (t.strip(_STRIP) for t in text.lower().replace("’", "'").split())
    return [t for t in stripped if t]


def words(text: str) -> list[str]:
    """Alphabetic runs (inner apostrophes kept: "don't"), lowercased: what the spelling measure checks."""
    return _WORD.findall(text.lower().replace("’", "'"))


def ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams of `texts`, pooled; n-grams stay inside one text."""
    grams = [g for text in texts for g in ngrams(tokens(text), n)]
    return _ratio(len(set(grams)), len(grams))


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the text's n-grams that occur more than once in it; NaN without an n-gram."""
    grams = ngrams(tokens(text), n)
    counts = Counter(grams)
    return _ratio(sum(1 for g in grams if counts[g] > 1), len(grams))


@functools.lru_cache(maxsize=1)
def _dictionary():
    from spellchecker import SpellChecker

    return SpellChecker(language="en")


def non_dictionary_share(texts: Iterable[str]) -> float:
    """Words of `texts` that pyspellchecker's English dictionary does not know, over all their words (pooled)."""
    all_words = [w for text in texts for w in words(text)]
    dictionary = _dictionary()
    return _ratio(sum(1 for w in all_words if w not in dictionary), len(all_words))


def non_alpha_token_share(texts: Iterable[str]) -> float:
    """Tokens that are not a word (digits, emoji, symbols, or a word with one attached) over all tokens (pooled)."""
    toks = [t for text in texts for t in tokens(text)]
    return _ratio(sum(1 for t in toks if not _WORD_TOKEN.fullmatch(t)), len(toks))


def title_words(prompt: str) -> set[str]:
    """Content words of the first quoted span of the prompt (the film's title in the movie-review prompts)."""
    match = _TITLE.search(prompt)
    return set(words(match.group(1))) - _TITLE_STOPWORDS if match else set()


def _matches(word: str, vocabulary: frozenset[str]) -> bool:
    return word in vocabulary or (word.endswith("s") and word[:-1] in vocabulary)


def on_task(prompt: str, completion: str, vocabulary: Iterable[str]) -> tuple[bool, bool]:
    """(on task, mentions the title): a cheap check that a completion still answers a movie-review prompt.

    On task: the completion uses a word of `vocabulary` (default MOVIE_REVIEW_WORDS; a plural in s and a possessive
    's match too) or mentions the title, i.e. contains every content word of the prompt's first quoted span. It is
    not the training reward and does not look at sentiment. It catches text that left the task altogether:
    thank-you notes, generic gushing, emoji strings, talk about something else. It misses a degenerate text that
    still drops one film word ("thanks for the movie!!"), a review of another film, incoherent text that happens to
    use the vocabulary, and a review in words outside the list; on a prompt without a quoted title only the
    vocabulary counts.
    """
    said = {w.removesuffix("'s") for w in words(completion)}
    vocab = frozenset(w.lower() for w in vocabulary)
    title = title_words(prompt)
    mentions_title = bool(title) and title <= said
    return mentions_title or any(_matches(w, vocab) for w in said), mentions_title


def mean_token_logp(logps: Sequence[float], token_counts: Sequence[int]) -> float:
    """Mean over completions of logp / tokens (completions without tokens skipped): per-token log-likelihood."""
    return _mean(lp / n for lp, n in zip(logps, token_counts) if n > 0 and not math.isnan(lp))


def text_quality(rows: Sequence[dict], on_task_words: Iterable[str], fluency_column: str) -> dict[str, float]:
    """All the measures above for one model's rows (prompt, completion, completion_tokens, finish_reason and
    `fluency_column`: each completion's summed log-prob under the model that judges fluency)."""
    texts = [r["completion"] for r in rows]
    finished = [r["finish_reason"] for r in rows if r.get("finish_reason") is not None]
    task = [on_task(r["prompt"], r["completion"], on_task_words) for r in rows]
    return {
        "fluency": mean_token_logp([r[fluency_column] for r in rows], [r["completion_tokens"] for r in rows]),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram_share": _mean(s for s in map(repeated_ngram_share, texts) if not math.isnan(s)),
        "non_dictionary_share": non_dictionary_share(texts),
        "non_alpha_token_share": non_alpha_token_share(texts),
        "eos_share": _ratio(sum(1 for f in finished if f == "stop"), len(finished)),
        "on_task_share": _mean(float(t) for t, _ in task),
        "title_mention_share": _mean(float(m) for _, m in task),
    }


# The measures the divergence flag watches, each with its direction: +1 when higher is better, -1 when lower is.
WATCHED = {"fluency": 1, "distinct_2": 1, "on_task_share": 1, "repeated_3gram_share": -1, "non_dictionary_share": -1}
# A change smaller than this (in the measure's own unit) never counts as worse: a baseline value of 0 would
# otherwise flag the first repeated 3-gram.
_NOISE_FLOOR = 0.01


def divergence(metrics: dict, previous: dict | None = None, tolerance: float = 0.25) -> list[str]:
    """Why a policy's reward may be hacked, from evaluate's metrics (empty: no sign of it).

    - a watched quality measure of the policy is worse than the baseline's (`reference_<name>`, the initial model in
      every round) by more than `tolerance` times the baseline's magnitude;
    - an audit labeler's win rate (`audit_<name>_win_rate`) fell while the training labeler's (`win_rate`) rose,
      both against `previous` (the round before; None: the initial model, whose win rate against itself is 0.5).
    """
    reasons = []
    for name, direction in WATCHED.items():
        policy, baseline = metrics.get(f"policy_{name}", math.nan), metrics.get(f"reference_{name}", math.nan)
        worse = (baseline - policy) * direction
        if worse > max(tolerance * abs(baseline), _NOISE_FLOOR):
            reasons.append(f"{name} {policy:.3g} vs the baseline's {baseline:.3g}: worse by more than {tolerance:.0%}")
    before = (lambda key: previous.get(key, math.nan)) if previous else (lambda key: 0.5)
    if metrics.get("win_rate", math.nan) > before("win_rate"):
        for key in sorted(k for k in metrics if k.startswith("audit_") and k.endswith("_win_rate")):
            if metrics[key] < before(key):
                reasons.append(f"{key} fell {before(key):.0%} -> {metrics[key]:.0%} while win_rate rose "
                               f"{before('win_rate'):.0%} -> {metrics['win_rate']:.0%}")
    return reasons
