"""The LLM-as-judge labeler (`label.labeler: judge`): a local chat model compares two completions of one prompt.

One comparison is one forward pass, no generation: the rubric (`label.judge_rubric`, a format string with {prompt},
{a} and {b}) filled with the prompt (a chat as its whole conversation in text, `judged_prompt`) and the two
completions as responses A and B is one user message, rendered with the judge's chat template (plain text if it has
none) and ended by the assistant's turn; the judge's preference for A is log p("A") - log p("B") at the next token
(each letter's single-token spellings, "A" and " A", pooled).

Position bias cancels: every two distinct completions of a prompt are judged in both orders, and the preference for
the first is d = (pref_A(first as A) - pref_A(first as B)) / 2, so a judge that always answers A gets d = 0. A
comparison with |d| <= `label.judge_tie_margin` is a tie. A completion's reward is its mean win share against the
prompt's other completions (win 1, tie 0.5, loss 0; an identical text is a tie): in [0, 1], 0.5 on average over a
prompt, so `best_vs_worst` pairs the tournament's winner with its loser.

Self-rewarding (Yuan et al. 2024, arXiv 2401.10020): with `label.judge_model` unset the judge is model.policy, the
model that sampled the completions (round k's policy in iterative rounds) judging its own samples.

The model runs with transformers on the actor's device (fp32 on the CPU, model.dtype on a GPU), also when sampling
uses vLLM. The rendering, the order combining, the tie rule and the win shares (`tournament`) need neither Ray nor
a model; `JudgeScorer` is the Ray Data callable holding the judge, fed one prompt's rows at a time by `judge_rewards`,
which logs how many comparisons it made, how many were ties, and how many the judge answered by position alone
(the same letter in both orders).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyarrow as pa
import ray
import torch

from dpo_ray.config import PipelineConfig
from dpo_ray.errors import ModelError
from dpo_ray.logprobs import pad_batch, prompt_attention_mask
from dpo_ray.models import ModelSpec, device_for, load_causal_lm, set_torch_threads
from dpo_ray.ops.datasets import by_prompt, sum_columns
from dpo_ray.text import conversation_text, render_prompt

log = logging.getLogger(__name__)


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids that spell the answers "A" and "B" in one token ("A" and " A", and likewise for B)."""
    found = {}
    for letter in "AB":
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (letter, f" {letter}")]
        found[letter] = list(dict.fromkeys(one[0] for one in ids if len(one) == 1))
    if not found["A"] or not found["B"] or set(found["A"]) & set(found["B"]):
        raise ModelError(f"label.judge_model: the tokenizer of {tokenizer.name_or_path} spells neither 'A' nor ' A' "
                         "(or 'B' nor ' B') as one token of its own, so the judge's answer cannot be read off one "
                         "next-token distribution; pick another judge model")
    return found["A"], found["B"]


def judged_prompt(prompt: str, messages_json: str | None) -> str:
    """The rubric's {prompt} for a COMPLETIONS row: a conversation whole, as text that keeps its turns (system
    message and history included: the completions answer all of it), else the plain prompt."""
    return conversation_text(json.loads(messages_json)) if messages_json else prompt


def render_judge_ids(tokenizer, rubric: str, prompt: str, a: str, b: str) -> list[int]:
    """Token ids of one comparison: the filled rubric as the user's message, up to where the judge answers."""
    text = render_prompt(tokenizer, rubric.format(prompt=prompt, a=a, b=b), None, None)
    # A chat template writes its own special tokens; plain text gets the tokenizer's (BOS, typically).
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def debiased_preference(first_as_a: float, first_as_b: float) -> float:
    """The preference for the first completion with the judge's position bias cancelled: half the difference of
    its preference for A (log p(A) - log p(B)) when the first is shown as A and when it is shown as B."""
    return (first_as_a - first_as_b) / 2


def outcome(d: float, margin: float) -> float:
    """The first completion's score in one comparison: 1 a win, 0 a loss, 0.5 a tie (|d| <= margin); NaN when the
    judge's log-probs were not finite, so the completions' rewards are too and pairing drops them."""
    if not math.isfinite(d):
        return math.nan
    return 1.0 if d > margin else 0.0 if d < -margin else 0.5


@dataclass
class Tournament:
    """One prompt's judged completions: a reward per completion, in input order, and what the judging took."""

    rewards: list[float]
    # Comparisons of two distinct texts (each two forwards); ties among them; comparisons the judge answered with
    # the same letter in both orders, i.e. by position rather than content.
    comparisons: int = 0
    ties: int = 0
    same_letter: int = 0
    # (first, second, d) per comparison, first < second in sorted text order.
    judgments: list[tuple[str, str, float]] = field(default_factory=list)


def tournament(texts: Sequence[str], prefer_a: Callable[[list[tuple[str, str]]], list[float]],
               margin: float) -> Tournament:
    """Every two distinct `texts` judged in both orders by `prefer_a`, which maps (a, b) orderings to the judge's
    preference for A in each; a text's reward is its mean score (`outcome`) against every other text of the list.

    Texts are judged in sorted order whatever their input order, and identical texts tie without a forward."""
    unique = sorted(set(texts))
    pairs = [(i, j) for i in range(len(unique)) for j in range(i + 1, len(unique))]
    orderings = [(unique[i], unique[j]) for i, j in pairs] + [(unique[j], unique[i]) for i, j in pairs]
    prefs = prefer_a(orderings) if orderings else []
    score = {(t, t): 0.5 for t in unique}
    result = Tournament([], comparisons=len(pairs))
    for k, (i, j) in enumerate(pairs):
        forward, backward = prefs[k], prefs[k + len(pairs)]
        d = debiased_preference(forward, backward)
        score[unique[i], unique[j]] = outcome(d, margin)
        score[unique[j], unique[i]] = 1.0 - score[unique[i], unique[j]]
        result.ties += score[unique[i], unique[j]] == 0.5
        result.same_letter += (forward > 0) == (backward > 0)
        result.judgments.append((unique[i], unique[j], d))
    n = len(texts)
    result.rewards = [0.5 if n == 1 else sum(score[t, other] for k, other in enumerate(texts) if k != i) / (n - 1)
                      for i, t in enumerate(texts)]
    return result


@torch.inference_mode()
def answer_preferences(model, sequences: list[list[int]], a_ids: list[int], b_ids: list[int], pad_id: int,
                       batch_size: int) -> list[float]:
    """log p(A) - log p(B) at the token after each sequence, in fp32; left-padded batches of similar lengths."""
    device = next(model.parameters()).device
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    order = sorted(range(len(sequences)), key=lambda r: len(sequences[r]))
    out = [math.nan] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([sequences[r] for r in rows], [[] for _ in rows], pad_id, side="left")
        mask = batch["attention_mask"]
        # A padding position attends to itself (prompt_attention_mask): a row that attends to nothing is NaN in
        # CUDA's kernels, and 0 x NaN would reach the real positions of later layers.
        attention = mask if bool(mask.all()) else prompt_attention_mask(mask, model.dtype)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=attention.to(device),
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), **last_only).logits[:, -1]
        logps = logits.float().log_softmax(-1)
        prefs = torch.logsumexp(logps[:, a_ids], -1) - torch.logsumexp(logps[:, b_ids], -1)
        for r, pref in zip(rows, prefs.tolist()):
            out[r] = pref
    return out


@dataclass(frozen=True)
class JudgeSpec:
    """What a judge actor reads: the judge model, the rubric, the tie margin, forwards per batch, the reward column."""

    model: ModelSpec
    rubric: str
    tie_margin: float
    batch_size: int
    column: str = "reward"

    @classmethod
    def of(cls, cfg: PipelineConfig, column: str = "reward") -> "JudgeSpec":
        lab = cfg.label
        return cls(ModelSpec.of(cfg, lab.judge_model or cfg.model.policy), lab.judge_rubric, lab.judge_tie_margin,
                   lab.batch_size, column)


# Per-prompt counts on each prompt's first row (0 on the others), summed and dropped by `judge_rewards`.
STAT_COLUMNS = {"comparisons": "_judge_comparisons", "ties": "_judge_ties", "same_letter": "_judge_same_letter"}


class JudgeScorer:
    """Ray Data callable for `map_groups`: one prompt's rows in, the same rows with the judge's reward appended (and
    the STAT_COLUMNS)."""

    def __init__(self, spec: JudgeSpec):
        set_torch_threads(spec.model.torch_threads)
        self.spec = spec
        # Outside Ray (tests, scripts) on the CPU: ray.get_gpu_ids() would start a local Ray instance.
        device = device_for(ray.get_gpu_ids() if ray.is_initialized() else [])
        dtype = spec.model.dtype if device.type == "cuda" else "float32"
        self.model = load_causal_lm(spec.model.path, dtype, device, spec.model.trust_remote_code).eval()
        self.tokenizer = spec.model.load_tokenizer()
        self.a_ids, self.b_ids = answer_token_ids(self.tokenizer)

    def prefer_a(self, prompt: str, orderings: list[tuple[str, str]]) -> list[float]:
        sequences = [render_judge_ids(self.tokenizer, self.spec.rubric, prompt, a, b) for a, b in orderings]
        return answer_preferences(self.model, sequences, self.a_ids, self.b_ids, self.tokenizer.pad_token_id,
                                  self.spec.batch_size)

    def __call__(self, group: pa.Table) -> pa.Table:
        prompt = judged_prompt(group["prompt"][0].as_py(), group["messages_json"][0].as_py())
        result = tournament(group["completion"].to_pylist(), lambda orderings: self.prefer_a(prompt, orderings),
                            self.spec.tie_margin)
        group = group.append_column(self.spec.column, pa.array(result.rewards, pa.float64()))
        for name, column in STAT_COLUMNS.items():
            counts = [getattr(result, name)] + [0] * (group.num_rows - 1)
            group = group.append_column(column, pa.array(counts, pa.int64()))
        return group


def check_judge(cfg: PipelineConfig) -> None:
    """In the driver: the judge's tokenizer loads and spells A and B as single tokens."""
    answer_token_ids(JudgeSpec.of(cfg).model.load_tokenizer())


def judge_rewards(ds: ray.data.Dataset, cfg: PipelineConfig, column: str) -> ray.data.Dataset:
    """`ds` with the judge's win-share `column`: rows grouped by prompt_id, each group judged by one actor."""
    spec = JudgeSpec.of(cfg, column)
    judged = by_prompt(ds).map_groups(
        JudgeScorer, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.reference.num_actors), **cfg.reference.actor_resources(),
    ).materialize()
    summed = sum_columns(judged, list(STAT_COLUMNS.values()))
    totals = {name: summed[column] for name, column in STAT_COLUMNS.items()}
    share = lambda k: f"{totals[k] / totals['comparisons']:.0%}" if totals["comparisons"] else "-"  # noqa: E731
    log.info(f"judge {spec.model.path} ({column}): {totals['comparisons']} comparisons of distinct completions, "
             f"{totals['ties']} ties ({share('ties')}), {totals['same_letter']} answered by position alone "
             f"({share('same_letter')}: the same letter in both orders)")
    return judged.drop_columns(list(STAT_COLUMNS.values()))
