"""Turning scored completions of one prompt into preference pairs (pure Python, no Ray, no torch)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Sequence


@dataclass
class PairStats:
    """What pair building kept and dropped: per prompt from `build_pairs`, summed over prompts by the label stage
    into its statistics."""

    prompts: int = 0
    completions: int = 0
    pairs: int = 0
    # Completions dropped because an earlier completion of the same prompt has the same text.
    identical_dropped: int = 0
    # Candidate pairs dropped because both sides scored the same.
    ties_dropped: int = 0
    # Candidate pairs dropped because their score gap is below min_margin.
    below_margin_dropped: int = 0
    # Pairs dropped because the filter reward (label.filter_labeler) disagreed with the labeler's order.
    filter_disagreed: int = 0
    # Pairs dropped because their chosen completion is less fluent than their rejected (label.fluency_guard).
    fluency_guard_dropped: int = 0
    # Prompts that yielded no pair at all.
    prompts_without_pair: int = 0
    nonfinite_scores: int = 0

    def add(self, other: "PairStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return asdict(self)


def build_pairs(
    texts: Sequence[str],
    scores: Sequence[float],
    mode: str = "best_vs_worst",
    min_margin: float = 0.0,
    filter_scores: Sequence[float] | None = None,
    filter_min_margin: float = 0.0,
    fluency: Sequence[float] | None = None,
    max_fluency_drop: float = 0.0,
) -> tuple[list[tuple[int, int]], PairStats]:
    """Indices (chosen, rejected) into the completions of ONE prompt, and what was dropped on the way.

    best_vs_worst: the highest- against the lowest-scoring distinct completion (one pair per prompt).
    all_pairs: every two distinct completions whose scores differ by at least min_margin.
    Identical texts collapse to their first occurrence; equal scores are ties and never make a pair; a pair
    needs a gap of at least min_margin (and above zero). A non-finite score removes its completion.
    filter_scores: a second, external score per completion; a pair survives only if its filter gap
    (chosen minus rejected) is at least filter_min_margin, so with 0 the filter may tie but never contradict.
    fluency: a per-token log-prob per completion; a pair survives only if its chosen's is at most
    max_fluency_drop below its rejected's.
    """
    if len(texts) != len(scores):
        raise ValueError(f"{len(texts)} texts but {len(scores)} scores")
    for name, extra in (("filter scores", filter_scores), ("fluency values", fluency)):
        if extra is not None and len(extra) != len(scores):
            raise ValueError(f"{len(scores)} scores but {len(extra)} {name}")
    stats = PairStats(prompts=1, completions=len(texts))
    keep = _pairable_completions(texts, scores, filter_scores, stats)
    candidates = _candidate_pairs(keep, scores, mode)
    pairs = []
    for chosen, rejected in candidates:
        gap = scores[chosen] - scores[rejected]
        if gap == 0:
            stats.ties_dropped += 1
        elif gap < min_margin:
            stats.below_margin_dropped += 1
        elif filter_scores is not None and not filter_scores[chosen] - filter_scores[rejected] >= filter_min_margin:
            stats.filter_disagreed += 1
        elif fluency is not None and not fluency[chosen] >= fluency[rejected] - max_fluency_drop:
            stats.fluency_guard_dropped += 1
        else:
            pairs.append((chosen, rejected))
    stats.pairs = len(pairs)
    stats.prompts_without_pair = int(not pairs)
    return pairs, stats


def _pairable_completions(
    texts: Sequence[str], scores: Sequence[float], filter_scores: Sequence[float] | None, stats: PairStats
) -> list[int]:
    """Indices of the completions with finite scores, each text at its first occurrence; the rest counted in
    `stats`."""
    seen: set[str] = set()
    keep: list[int] = []
    for i, (text, score) in enumerate(zip(texts, scores)):
        if not _finite(score) or (filter_scores is not None and not _finite(filter_scores[i])):
            stats.nonfinite_scores += 1
        elif text in seen:
            stats.identical_dropped += 1
        else:
            seen.add(text)
            keep.append(i)
    return keep


def _candidate_pairs(keep: list[int], scores: Sequence[float], mode: str) -> list[tuple[int, int]]:
    """(higher, lower)-scoring index pairs of `mode` among `keep`, before any margin or filter."""
    if mode == "best_vs_worst":
        if len(keep) < 2:
            return []
        # Stable sorts: among equal scores the earliest completion wins, so results are deterministic.
        best = max(keep, key=lambda i: scores[i])
        worst = min(keep, key=lambda i: scores[i])
        return [(best, worst)] if best != worst else [(keep[0], keep[1])]
    if mode == "all_pairs":
        return [(a, b) if scores[a] >= scores[b] else (b, a) for a_pos, a in enumerate(keep) for b in keep[a_pos + 1 :]]
    raise ValueError(f"pairing mode {mode!r}: expected best_vs_worst or all_pairs")


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def replay_count(new_pairs: int, pool: int, share: float) -> int:
    """How many earlier pairs to add to `new_pairs` so that they make `share` of the whole (at most the pool)."""
    if share <= 0 or new_pairs == 0:
        return 0
    return min(pool, round(new_pairs * share / (1 - share)))


def replay_choice(pair_ids: Sequence[str], count: int, seed: int) -> list[int]:
    """The indices of `count` pairs drawn without replacement, each pair ranked by a hash of the seed and its id: the
    same draw whatever order the pool was read in, and a larger count keeps every pair a smaller one drew."""
    rank = sorted(range(len(pair_ids)),
                  key=lambda i: hashlib.blake2b(f"{seed}:{pair_ids[i]}".encode(), digest_size=8).digest())
    return sorted(rank[:count])
