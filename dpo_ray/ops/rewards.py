"""The labelers: each appends a reward column to a Ray dataset of completions (prompt/completion text and
prompt_ids/completion_ids), higher is better.

- `sentiment`: VADER compound sentiment of the completion, in [-1, 1];
- `textblob`: TextBlob's pattern-lexicon polarity of the completion, in [-1, 1]: a second lexicon, to audit a run
  that trains on VADER (it is moved by many of the same words, so it is a weak audit);
- `reward_model`: any local AutoModelForSequenceClassification folder with a single output, shown the whole
  conversation (system message and earlier turns) in its own chat template;
- `implicit`: the DPO implicit reward beta*log(pi/pi_ref) of a given policy and reference (self-labeling);
- `judge`: a chat model's pairwise verdicts in both orders, as each completion's win share in [0, 1] (ops/judge.py).

A labeler is one class with `check()` (driver-side, before any work), `add_rewards(ds, column, sampled_by)` and
`completion_key()`; adding one is adding a class to `LABELERS`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib.metadata import version

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from dpo_ray.config import PipelineConfig
from dpo_ray.errors import ModelError
from dpo_ray.models import (ModelSpec, device_for, model_fingerprint, resolve_model, set_torch_threads,
                            skip_unused_imports)
from dpo_ray.ops.datasets import map_model_batches
from dpo_ray.ops.judge import check_judge, judge_rewards
from dpo_ray.ops.scorers import completion_logps_columns, scorer_pool
from dpo_ray.text import conversation_text, prompt_messages


@functools.cache
def vader():
    """VADER's analyzer, built once per process: its lexicon takes a moment to load."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@functools.cache
def textblob():
    """TextBlob's pattern analyzer (its bundled lexicon; no NLTK corpus download), built once per process."""
    from textblob.en.sentiments import PatternAnalyzer

    return PatternAnalyzer()


def lexicon_column(batch: pa.Table, column: str, lexicon: type[Lexicon]) -> pa.Table:
    return batch.append_column(column, pa.array([lexicon.score(text) for text in batch["completion"].to_pylist()],
                                                pa.float64()))


def reward_model_text(tokenizer, prompt: str, messages_json: str | None, completion: str) -> str:
    """What the reward model reads for one completion: with a chat template of its own, the whole conversation
    (system message and earlier turns included) ended by the completion as the assistant's turn, rendered by that
    template; without one, the conversation as plain text that keeps its turns (text.conversation_text,
    Anthropic-HH's "Human:"/"Assistant:" form); a plain-text prompt without a system message, which has no turns to
    keep, as the prompt, a newline and the completion."""
    if tokenizer.chat_template:
        messages = prompt_messages(prompt, messages_json, None) + [{"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if messages_json:
        return conversation_text(json.loads(messages_json) + [{"role": "assistant", "content": completion}])
    return f"{prompt}\n{completion}"


class RewardModelScorer:
    """Ray Data callable: the reward model's score of each completion in its conversation (reward_model_text)."""

    def __init__(self, model: ModelSpec, batch_size: int, column: str = "reward"):
        skip_unused_imports()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        set_torch_threads(model.torch_threads)
        self.column, self.batch_size = column, batch_size
        local = resolve_model(model.path)
        self.device = device_for(ray.get_gpu_ids())
        self.model = AutoModelForSequenceClassification.from_pretrained(
            local, trust_remote_code=model.trust_remote_code, use_safetensors=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def encode(self, prompts: list[str], messages: list[str | None], completions: list[str]):
        """The reward model's input tensors for COMPLETIONS rows' prompt, messages_json and completion. A rendered
        template already holds its special tokens (BOS included), so none are added again."""
        texts = [reward_model_text(self.tokenizer, p, m, c) for p, m, c in zip(prompts, messages, completions)]
        return self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                              add_special_tokens=not self.tokenizer.chat_template).to(self.device)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [batch[name].to_pylist() for name in ("prompt", "messages_json", "completion")]
        scores = []
        for start in range(0, batch.num_rows, self.batch_size):
            enc = self.encode(*(column[start : start + self.batch_size] for column in columns))
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return batch.append_column(self.column, pa.array(scores, pa.float64()))


@dataclass
class Labeler:
    cfg: PipelineConfig

    def check(self) -> None:
        """Raise a user error (config, model) in the driver, before any data is read or generated."""

    def add_rewards(self, ds: ray.data.Dataset, column: str, sampled_by: str | None) -> ray.data.Dataset:
        """`ds` with `column` (float64) appended; `sampled_by` names the model that sampled every row, if known."""
        raise NotImplementedError

    def completion_key(self) -> dict | None:
        """What a completion's reward depends on besides its own row, when nothing else does, so that the rewards
        of samples kept for later evaluations (evaluate's baseline side) can be kept with them; None for a labeler
        that reads other rows or a model that changes between evaluations (the judge, the implicit reward)."""
        return None


class Lexicon(Labeler):
    """A sentiment lexicon scoring each completion's text alone (`score`), from the package `package`."""

    name: str
    package: str

    @staticmethod
    def score(text: str) -> float:
        raise NotImplementedError

    def completion_key(self) -> dict:
        return {"labeler": self.name, "version": version(self.package)}

    def add_rewards(self, ds: ray.data.Dataset, column: str, sampled_by: str | None) -> ray.data.Dataset:
        # Tasks, not an actor pool: the lexicon is small and Ray reuses its worker processes for tasks, whereas each
        # actor is a new process (3.5 s of every label and evaluate stage on two cores, benchmarks/README.md).
        return ds.map_batches(lexicon_column, fn_kwargs={"column": column, "lexicon": type(self)},
                              batch_format="pyarrow", batch_size=self.cfg.label.batch_size, num_cpus=0.5)


class Vader(Lexicon):
    name, package = "sentiment", "vaderSentiment"

    @staticmethod
    def score(text: str) -> float:
        return vader().polarity_scores(text)["compound"]


class TextBlob(Lexicon):
    name, package = "textblob", "textblob"

    @staticmethod
    def score(text: str) -> float:
        return textblob().analyze(text).polarity


class RewardModel(Labeler):
    def check(self) -> None:
        """A missing reward model folder, or a head that does not give one score per sequence (a 2-class
        sentiment classifier, say), fails here in the driver rather than in an actor later."""
        from transformers import AutoConfig

        path = self.cfg.label.reward_model
        config = AutoConfig.from_pretrained(resolve_model(path), trust_remote_code=self.cfg.model.trust_remote_code)
        if config.num_labels != 1:
            raise ModelError(f"label.reward_model: {path} has a {config.num_labels}-output head; a reward model "
                             "needs a single-score head (num_labels=1)")

    def completion_key(self) -> dict:
        return {"labeler": "reward_model", "model": model_fingerprint(self.cfg.label.reward_model)}

    def add_rewards(self, ds: ray.data.Dataset, column: str, sampled_by: str | None) -> ray.data.Dataset:
        cfg = self.cfg
        return map_model_batches(
            ds, RewardModelScorer, scorer_pool(cfg, cfg.label.batch_size),
            fn_constructor_kwargs={"model": ModelSpec.of(cfg, cfg.label.reward_model),
                                   "batch_size": cfg.label.batch_size, "column": column},
        )


class ImplicitReward(Labeler):
    def add_rewards(self, ds: ray.data.Dataset, column: str, sampled_by: str | None) -> ray.data.Dataset:
        """Also appends `reference_token_logp`, the reference's log-prob per completion token (what
        label.fluency_guard compares). `sampled_by`: the model whose `sample_logp` every row carries, if one did;
        its log-probs are then taken from the sampler instead of scored again where they are exact."""
        cfg, lab = self.cfg, self.cfg.label
        ds = completion_logps_columns(ds, cfg, [(lab.implicit_policy or cfg.model.policy, "_implicit_policy_logp"),
                                                (lab.implicit_reference or cfg.reference_model,
                                                 "_implicit_reference_logp")], sampled_by).materialize()
        beta = lab.implicit_beta

        def implicit_reward(batch: pa.Table) -> pa.Table:
            reference = batch["_implicit_reference_logp"]
            diff = pc.subtract(batch["_implicit_policy_logp"], reference)
            tokens = pc.max_element_wise(pc.list_value_length(batch["completion_ids"]), 1)
            batch = batch.drop_columns(["_implicit_policy_logp", "_implicit_reference_logp"])
            return (batch.append_column(column, pc.multiply(diff, beta))
                    .append_column("reference_token_logp", pc.divide(reference, pc.cast(tokens, pa.float64()))))

        return ds.map_batches(implicit_reward, batch_format="pyarrow")


class Judge(Labeler):
    def check(self) -> None:
        check_judge(self.cfg)

    def add_rewards(self, ds: ray.data.Dataset, column: str, sampled_by: str | None) -> ray.data.Dataset:
        return judge_rewards(ds, self.cfg, column)


LABELERS = {Vader.name: Vader, TextBlob.name: TextBlob, "reward_model": RewardModel, "implicit": ImplicitReward,
            "judge": Judge}


def labeler(cfg: PipelineConfig, name: str) -> Labeler:
    """The labeler config key `name` selects (label.labeler, label.filter_labeler, evaluate.labeler)."""
    return LABELERS[name](cfg)


def check_labeler(cfg: PipelineConfig, name: str | None) -> None:
    """Fail in the driver before a stage reads or generates anything, not in an actor later."""
    if name is not None:
        labeler(cfg, name).check()


def add_rewards(ds: ray.data.Dataset, cfg: PipelineConfig, name: str | None = None,
                sampled_by: str | None = None, column: str = "reward") -> ray.data.Dataset:
    """`ds` with a `column` of rewards from labeler `name` (default: label.labeler)."""
    return labeler(cfg, name or cfg.label.labeler).add_rewards(ds, column, sampled_by)
