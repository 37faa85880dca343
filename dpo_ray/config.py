"""Typed pipeline configuration: YAML in, validated pydantic out, one-line errors that name the bad key.

Every section forbids unknown keys, so a typo such as `train.betta` fails at load instead of being ignored.
Dotted overrides (`train.beta=0.2`) are parsed as YAML scalars and applied before validation.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpo_ray.errors import ConfigError
from dpo_ray.losses import REFERENCE_FREE, LossType
from dpo_ray.quality import MOVIE_REVIEW_WORDS

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTIN_TINY = "builtin:tiny-llama"
# Labelers that score a completion from outside the policy (ops/rewards.py): what may filter, evaluate or audit.
ExternalLabeler = Literal["sentiment", "textblob", "reward_model", "judge"]


class _Section(BaseModel):
    # NaN or inf in a float (train.lr=nan, frontier.betas=[.inf]) can only fail later, mid-training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(_Section):
    name: str = "default"
    root: str = "runs"
    seed: int = 0
    experiment: str = "dpo-ray"
    # None: $MLFLOW_TRACKING_URI if set, else sqlite:///<root>/mlflow.db (absolute path).
    tracking_uri: str | None = None
    # Log each trained policy to its train stage's MLflow run as a transformers model (a copy of the weights in
    # the artifact store: <root>/mlartifacts locally, the server's store otherwise).
    log_model: bool = True
    # With a name, each logged policy is also a new version of this registered model.
    registered_model: str | None = None
    # None: join $RAY_ADDRESS or a running cluster if any, else start a local one.
    ray_address: str | None = None
    # CPU threads per torch process (model actors, training workers); 0: all cores of the node. Set it when
    # several model actors or workers share a node.
    torch_threads: int = Field(0, ge=0)
    # Compare every stage's CPU/GPU request with the cluster before any work; turn off on an autoscaling
    # cluster whose nodes appear only on demand.
    check_resources: bool = True

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        # A folder under run.root: no separator, no "..", nothing that could write elsewhere.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            raise ValueError(f"run.name: {name!r} must be a folder name (letters, digits, '.', '_', '-'; "
                             "starting with a letter or digit)")
        return name


class ModelConfig(_Section):
    # builtin:smollm2-135m-instruct, builtin:tiny-llama, a local Hugging Face folder, or a hub id.
    policy: str = BUILTIN_SMOLLM2
    # None: the same weights as the initial policy.
    reference: str | None = None
    # float32; bf16-mixed: float32 weights, optimizer and log-probs with bf16 matmuls (torch.autocast) in training
    # and the reference pass, everything else (sampling, labeling, evaluation) in float32 (models.inference_dtype):
    # for CPUs with bf16 matmul units (AMX, AVX512-BF16); bfloat16/float16: the weights themselves (GPUs).
    # auto: bfloat16 when train.use_gpu, else bf16-mixed where the CPU reading the config (the driver's, so a
    # cluster's CPU nodes are taken to be alike) has bf16 units, else float32 (emulated bf16 is slower there).
    # Not the default: its quality was measured on two seeds only (README, "Precision").
    dtype: Literal["auto", "float32", "bf16-mixed", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class DataConfig(_Section):
    # Prompts: JSON Lines or a JSON array (either gzipped), Parquet, a saved `datasets` folder or a hub dataset id,
    # with a `prompt` (text or chat) or `messages` (chat) column (dpo_ray/inputs.py has every form).
    prompts: str | None = "data/prompts/movie_reviews.jsonl"
    # Existing preference data (prompt/chosen/rejected) for offline DPO; replaces sample + label.
    preferences: str | None = None
    system_prompt: str | None = None
    num_train_prompts: int | None = Field(None, ge=1)
    num_eval_prompts: int = Field(32, ge=0)
    max_prompt_tokens: int = Field(128, ge=8)
    max_completion_tokens: int = Field(128, ge=1)
    # How a too-long prompt is cut: keep its end (the instruction usually is last) or its start.
    prompt_truncation: Literal["keep_end", "keep_start"] = "keep_end"
    on_bad_rows: Literal["error", "skip"] = "error"
    # The split read from a saved DatasetDict folder or a hub dataset (both data.prompts and data.preferences).
    split: str = "train"
    # Our column names mapped to the file's, where they differ: {prompt: question, chosen: response_j, ...}.
    columns: dict[str, str] = {}
    # Seed of the held-out prompts: which prompts are held out, and evaluation's and the KL probes' sampling of
    # them. None: run.seed. Rounds fix it to the first round's seed while each round samples with its own, so every
    # round is judged on the same held-out prompts (and the baseline's samples of them, cached) and none of them is
    # trained on in any round.
    held_out_seed: int | None = None

    @field_validator("columns")
    @classmethod
    def _our_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        ours = ("prompt", "chosen", "rejected", "messages", "system", "id")
        for name, theirs in columns.items():
            if name not in ours:
                raise ValueError(f"data.columns: {name!r} is not one of ours ({', '.join(ours)}); map those to "
                                 "your file's column names")
            if list(columns.values()).count(theirs) > 1:
                raise ValueError(f"data.columns: {theirs!r} is mapped twice; one column cannot play two parts")
        return columns


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"{name} has its own key (cpus_/gpus_per_actor, cpus_per_worker, use_gpu)")
        if not amount > 0:
            raise ValueError(f"{name} = {amount:g} must be > 0")
    return resources


CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class _ActorPool(_Section):
    """Resources of a stage's Ray Data actor pool, each actor holding one model."""

    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    # Custom Ray resources per actor, e.g. {sampler: 1} to keep the actors on the nodes started with
    # `ray start --resources='{"sampler": 4}'`.
    resources: CustomResources = {}

    def actor_resources(self) -> dict:
        """What each actor of the pool asks Ray for (map_batches' num_cpus, num_gpus and resources)."""
        return {"num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor, "resources": self.resources}


class SampleConfig(_ActorPool):
    backend: Literal["transformers", "vllm"] = "transformers"
    n: int = Field(4, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Prompts per generate call (each prompt yields n sequences).
    batch_size: int = Field(16, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)


class LabelConfig(_Section):
    labeler: Literal[ExternalLabeler, "implicit"] = "sentiment"
    # reward_model labeler: a local AutoModelForSequenceClassification folder with one output.
    reward_model: str | None = None
    # implicit labeler: beta*log(policy/reference); both default to model.policy / model.reference.
    implicit_policy: str | None = None
    implicit_reference: str | None = None
    implicit_beta: float = Field(0.1, gt=0)
    pairing: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"
    min_margin: float = Field(0.0, ge=0)
    # An external reward that must not contradict the labeler (e.g. implicit self-labels filtered by sentiment):
    # a pair is kept only if this reward's gap, chosen minus rejected, is at least filter_min_margin.
    filter_labeler: ExternalLabeler | None = None
    filter_min_margin: float = Field(0.0, ge=0)
    # implicit labeler: drop a pair whose chosen completion's mean log-prob per token under the implicit reference is
    # more than this many nats below the rejected's (None: no guard). The implicit reward is highest where the
    # reference finds a sample least likely, and those samples are the ones leaving the task; 0 keeps a pair only
    # if its chosen is at least as fluent as its rejected (benchmarks/README.md, 2026-12-06, the fluency guard).
    fluency_guard: float | None = Field(None, ge=0)
    batch_size: int = Field(32, ge=1)
    # judge labeler (ops/judge.py): a chat model compares two completions of a prompt, in both orders; a completion's
    # reward is its mean win share against the prompt's other completions (win 1, tie 0.5, loss 0), in [0, 1].
    # judge_model None: model.policy judges its own samples (self-rewarding, Yuan et al. 2024); else any model spec.
    judge_model: str | None = None
    # The judge's user message: a format string with {prompt}, {a} and {b} (a literal brace is {{ or }}) that asks
    # for a one-letter answer, A or B.
    judge_rubric: str = (
        "Which response answers the prompt better? Judge how well each one does what the prompt asks: relevance, "
        "accuracy, clarity and fluency.\n\n"
        "Prompt:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
        "Which response is better? Answer with A or B."
    )
    # A comparison is a tie when the judge's order-debiased preference, in nats of log-odds (log p(A) - log p(B)),
    # is at most this. 0.05 (within 1.25 points of a coin flip) is far above the ~1e-4 of batching noise; with
    # SmolLM2-135M judging 20 obvious pairs it kept 15 right verdicts and 1 wrong (0.1: 13 and the same 1; 0: 18, 2).
    judge_tie_margin: float = Field(0.05, ge=0)

    @field_validator("judge_rubric")
    @classmethod
    def _rubric_fields(cls, rubric: str) -> str:
        try:
            named = {name for _, name, _, _ in string.Formatter().parse(rubric) if name is not None}
            rubric.format(prompt="", a="", b="")
        except (ValueError, KeyError, IndexError, AttributeError) as err:
            raise ValueError(f"label.judge_rubric: not a format string with only {{prompt}}, {{a}} and {{b}} "
                             f"({type(err).__name__}: {err}); write a literal brace as {{{{ or }}}}") from None
        missing = [f"{{{name}}}" for name in ("prompt", "a", "b") if name not in named]
        if missing:
            raise ValueError(f"label.judge_rubric: lacks {', '.join(missing)}; the judge must see the prompt and "
                             "both responses")
        return rubric

    @model_validator(mode="after")
    def _reward_model_needs_path(self) -> "LabelConfig":
        for key in ("labeler", "filter_labeler"):
            if getattr(self, key) == "reward_model" and not self.reward_model:
                raise ValueError(f"label.reward_model: required when label.{key} is reward_model")
        if self.fluency_guard is not None and self.labeler != "implicit":
            raise ValueError(f"label.fluency_guard: guards the implicit labeler's pairs, not {self.labeler}'s; "
                             "set label.labeler=implicit or leave it unset")
        if self.filter_labeler == self.labeler:
            raise ValueError(f"label.filter_labeler: {self.labeler} would only filter by itself; pick another "
                             "reward or leave it unset")
        return self


class ReferenceConfig(_ActorPool):
    # Rows per forward pass: pairs here (both completions of a pair share its prompt's forward), completions when
    # the label and evaluate stages score samples with this pool's settings.
    batch_size: int = Field(8, ge=1)
    # Keep every scored sequence's log-prob under <run.root>/reference_cache/ and never score it twice with the
    # same reference model (later rounds, relabeled reruns, other runs under the same root); and evaluate's baseline
    # side under <run.root>/eval_reference_cache/ (stages/evaluate.py).
    cache: bool = True
    # Replay (iterative rounds): the share of the pairs this stage writes that are drawn from earlier rounds' pairs
    # (the `replay` source: every earlier round's label/pairs); 0.25 adds one earlier pair per three new ones.
    # Their log-probs come from the cache when the reference is unchanged.
    replay_share: float = Field(0.0, ge=0, lt=1)
    # Where a stage needs log-probs under several models (evaluate, the KL-budget probes, the implicit labeler), one
    # actor holds them all (and the transformers sampler too, where it samples the rows): one process start and one
    # round of imports instead of one per model, 6-7 s each on two cores. None: shared unless sample or reference
    # asks for GPUs (gpus_per_actor), whose memory then holds one model per actor.
    share_actor: bool | None = None


class LoraSettings(_Section):
    """train.lora: train a LoRA adapter (peft) on the frozen policy; the base model is the reference."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names to adapt, or "all-linear" (every linear layer but the LM head).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Also write the base with the adapter merged in as <train>/policy (what sampling, evaluation and the next
    # round load); false: <train>/policy is the adapter folder, loaded onto its base wherever a model is loaded.
    merge: bool = True
    # QLoRA: "nf4" trains the adapter on the base loaded 4-bit (bitsandbytes NF4, computing in model.dtype), and the
    # reference stage scores that same quantized base; None: the base in model.dtype.
    quantize: Literal["nf4"] | None = None


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


class TrainConfig(_Section):
    # sigmoid, ipo and hinge train against the reference stage's log-probs; simpo and orpo need none, and the
    # pipeline skips the reference stage for them (losses.py has every formula).
    loss: LossType = "sigmoid"
    # For orpo, the weight of the odds-ratio term (ORPO's lambda).
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # Weight of the NLL term on chosen completions (RPO; with simpo, CPO-SimPO); 0 disables it.
    rpo_alpha: float = Field(0.0, ge=0)
    # SimPO's target reward margin gamma (the loss is -log sigmoid(beta * (mean-token margin) - gamma)).
    simpo_gamma: float = Field(0.5, ge=0)
    # Divide every log-prob (policy and reference) by its completion's token count before sigmoid, ipo or hinge.
    # true with ipo is TRL's IPO; false (the default) sums over tokens as the DPO authors' code does.
    length_normalize: bool = False
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    epochs: int = Field(1, ge=1)
    # Pairs per optimizer step across all workers, and per forward pass on one worker.
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_nonfinite_steps: int = Field(3, ge=1)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    # Custom Ray resources per worker, as for the actor pools (e.g. {trainer: 1}).
    resources: CustomResources = {}
    use_gpu: bool = False
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    # Recompute each layer's activations in the backward instead of keeping them: less memory, about a third more
    # compute, and no prompt sharing between chosen and rejected (the KV cache is off under checkpointing).
    gradient_checkpointing: bool = False
    # DeepSpeed ZeRO-Offload: keep the optimizer state (two fp32 copies of every weight for AdamW) in CPU memory and
    # step there; the GPUs then hold weights, gradients and activations only.
    offload_optimizer: bool = False
    # LoRA instead of full fine-tuning, e.g. {r: 16, alpha: 32}; None: every weight trains.
    lora: LoraSettings | None = None
    checkpoint_every: int = Field(20, ge=1)
    max_failures: int = Field(0, ge=-1)
    # Start from this model instead of model.policy (a later round's previous policy, say).
    init_from: str | None = None
    # Keep the last checkpoint whose KL to evaluate.baseline (the initial model in rounds), probed on
    # kl_probe_prompts held-out prompts, is at most this many nats (ops/kl_budget.py); None: keep the last.
    kl_budget: float | None = Field(None, gt=0)
    kl_probe_prompts: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _offload_needs_deepspeed(self) -> "TrainConfig":
        if self.offload_optimizer and self.strategy != "deepspeed":
            raise ValueError("train.offload_optimizer: needs train.strategy=deepspeed (ZeRO-Offload)")
        return self

    @model_validator(mode="after")
    def _quantize_options(self) -> "TrainConfig":
        if not (self.lora and self.lora.quantize):
            return self
        if self.strategy == "deepspeed":
            # ZeRO-3 cannot partition bitsandbytes' 4-bit weights. ZeRO-2 trained (2 CPU workers) but its checkpoint
            # did not resume: DeepSpeed's strict module load rejects the 4-bit weights' quant-state keys.
            why = ("cannot partition bitsandbytes' 4-bit weights" if self.zero_stage == 3 else
                   "checkpoints do not resume with bitsandbytes' 4-bit weights")
            raise ValueError(f"train.lora.quantize: {self.lora.quantize} needs train.strategy=ddp "
                             f"(DeepSpeed ZeRO-{self.zero_stage} {why})")
        if not _bitsandbytes_installed():
            raise ValueError("train.lora.quantize: needs bitsandbytes, which is not installed: "
                             "pip install 'dpo-ray[qlora]'")
        return self

    @model_validator(mode="after")
    def _loss_options(self) -> "TrainConfig":
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ValueError(f"train.label_smoothing: applies to the sigmoid and simpo losses, not {self.loss}")
        if self.rpo_alpha and self.loss == "orpo":
            raise ValueError("train.rpo_alpha: orpo already has its NLL term; leave rpo_alpha at 0")
        if self.length_normalize and self.loss in REFERENCE_FREE:
            raise ValueError(f"train.length_normalize: {self.loss} is length-normalized by definition; leave it false")
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        per_worker, rest = divmod(self.batch_size, self.num_workers)
        if rest or per_worker % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size: {self.batch_size} must equal num_workers ({self.num_workers}) "
                f"x micro_batch_size ({self.micro_batch_size}) x an integer number of accumulation steps"
            )
        return self


class EvaluateConfig(_Section):
    # The external reward that judges policy against reference; None: label.labeler.
    labeler: ExternalLabeler | None = None
    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    # Temperature 1 samples the policy itself, which the Monte-Carlo KL estimate assumes.
    temperature: float = Field(1.0, gt=0)
    num_examples: int = Field(8, ge=0)
    # The on-task measure (quality.on_task): a completion is on task if it uses one of these words or mentions the
    # prompt's quoted title. The default is for movie reviews (data/prompts/movie_reviews.jsonl); set your own
    # dataset's words, or [] to count title mentions alone.
    on_task_words: list[str] = list(MOVIE_REVIEW_WORDS)
    # The model the policy is judged against; None: the reference model. Rounds after the first set it to the
    # initial reference, so every round is judged against the same model whatever it trains against.
    baseline: str | None = None
    # Labelers that score the same held-out samples but never train (ExternalLabeler): each one's mean
    # reward and win rate is reported as audit_<name>_*, so a reward that only the training labeler sees shows.
    audit_labelers: list[ExternalLabeler] = []
    # The divergence flag (quality.divergence): raised when a text-quality measure of the policy is worse than the
    # baseline's by more than this share of the baseline's value, or when an audit's win rate falls while the
    # training labeler's rises.
    quality_tolerance: float = Field(0.25, gt=0)

    @field_validator("audit_labelers")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate.audit_labelers: {names} names a labeler twice")
        return names


class RoundsConfig(_Section):
    """Iterative DPO: round k samples from round k-1's policy, labels, scores the reference, trains, evaluates."""

    count: int = Field(1, ge=1)
    # The reference of round k: the initial model, round k-1's policy, or TR-DPO's soft update (Gorbatovski et al.,
    # 2024): round k-1's reference moved toward its policy, alpha*policy + (1-alpha)*reference, weight by weight.
    reference: Literal["initial", "previous", "soft"] = "initial"
    reference_alpha: float = Field(0.5, gt=0, le=1)
    # Round k's training starts from round k-1's policy, or again from the initial model.
    init: Literal["previous", "initial"] = "previous"
    # KL to the initial model allowed at the last round, spent linearly: round k trains with train.kl_budget =
    # k/count of it (a round's own train.kl_budget in `overrides` wins).
    kl_budget: float | None = Field(None, gt=0)
    # Per-round config changes, e.g. {2: {label: {labeler: implicit}}} for self-labeling from round 2 on.
    overrides: dict[int, dict] = {}


class FrontierConfig(_Section):
    """pipelines/frontier.py: one policy per (loss, beta) on the same pairs and reference log-probs."""

    betas: list[float] = [0.05, 0.1, 0.5]
    losses: list[LossType] = ["sigmoid", "ipo"]
    # Ray Train runs at once; 0: as many as the cluster's CPUs and GPUs hold (see concurrent_trainings).
    max_concurrent: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _positive(self) -> "FrontierConfig":
        if not self.betas or min(self.betas) <= 0:
            raise ValueError("frontier.betas: need at least one beta, all > 0")
        return self


def bf16_matmul_units() -> list[str]:
    """The CPU flags (Linux's /proc/cpuinfo) of units that run bf16 matmuls natively; [] where none or unknown."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted({"amx_bf16", "avx512_bf16"} & set(flags.split(":", 1)[1].split()))


class PipelineConfig(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()
    label: LabelConfig = LabelConfig()
    reference: ReferenceConfig = ReferenceConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    rounds: RoundsConfig = RoundsConfig()
    frontier: FrontierConfig = FrontierConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        if self.data.preferences is None:
            if self.data.prompts is None:
                raise ValueError("data.prompts: required unless data.preferences is given")
            if self.sample.n < 2:
                raise ValueError("sample.n: must be at least 2 to build preference pairs")
            if self.sample.temperature == 0:
                raise ValueError(f"sample.temperature: 0 is greedy decoding, so the sample.n={self.sample.n} "
                                 "completions of a prompt are identical and make no pairs; use a temperature > 0")
        if self.evaluate.labeler is None and self.label.labeler == "implicit":
            raise ValueError("evaluate.labeler: required when label.labeler is implicit (an external labeler: "
                             "sentiment, textblob, reward_model or judge)")
        lab = self.label
        if lab.labeler == "implicit" and (lab.implicit_policy or self.model.policy) == (
                lab.implicit_reference or self.reference_model):
            raise ValueError("label.implicit_policy: the implicit labeler needs a policy that differs from its "
                             "reference (use it from round 2 on via rounds.overrides, or set implicit_policy)")
        if "reward_model" in (self.evaluate.labeler, *self.evaluate.audit_labelers) and not self.label.reward_model:
            raise ValueError("label.reward_model: required when evaluate.labeler or evaluate.audit_labelers names "
                             "reward_model")
        if self.train.loss in REFERENCE_FREE and self.reference.replay_share > 0:
            raise ValueError(f"reference.replay_share: replay is drawn by the reference stage, which train.loss="
                             f"{self.train.loss} skips (it needs no reference log-probs)")
        lora = self.train.lora
        if self.rounds.count > 1 and lora and not lora.merge and self.sample.backend == "vllm":
            raise ValueError("train.lora.merge: false makes round 2 train an adapter on round 1's adapter, and "
                             "sample.backend=vllm applies one adapter to a full model; merge, or sample with "
                             "transformers")
        if self.rounds.kl_budget is not None and self.train.kl_budget is not None:
            raise ValueError("rounds.kl_budget: set it or train.kl_budget, not both (rounds.kl_budget sets each "
                             "round's train.kl_budget; rounds.overrides sets one round's)")
        used = {self.evaluate.labeler or self.label.labeler, self.label.labeler, self.label.filter_labeler}
        if used & set(self.evaluate.audit_labelers):
            raise ValueError(f"evaluate.audit_labelers: {sorted(used & set(self.evaluate.audit_labelers))} already "
                             "labels, filters or judges this run; an audit must be a labeler the run does not use")
        return self

    @model_validator(mode="after")
    def _resolve_dtype(self) -> "PipelineConfig":
        conflict = self._bf16_mixed_conflict()
        if self.model.dtype == "auto":
            units = bf16_matmul_units()
            if self.train.use_gpu:
                self.model.dtype, why = "bfloat16", "train.use_gpu"
            elif units and not conflict:
                self.model.dtype, why = "bf16-mixed", f"this CPU has {', '.join(units)}"
            else:
                self.model.dtype, why = "float32", conflict or "this CPU has no bf16 matmul units"
            # Logged where a command reads its config; the configs made from this one (rounds) name their dtype.
            log.info(f"model.dtype auto -> {self.model.dtype} ({why})")
        elif self.model.dtype == "bf16-mixed" and conflict:
            raise ValueError(f"model.dtype: {conflict}")
        return self

    def _bf16_mixed_conflict(self) -> str | None:
        """Why this config cannot run bf16-mixed; None where it can."""
        if self.train.use_gpu or self.sample.gpus_per_actor or self.reference.gpus_per_actor:
            return "bf16-mixed is the CPU's mixed precision; on GPUs use bfloat16"
        if self.train.strategy == "deepspeed":
            return "bf16-mixed trains with train.strategy=ddp; DeepSpeed keeps its own precision"
        if self.train.lora and self.train.lora.quantize:
            return "bf16-mixed is not for a 4-bit base (train.lora.quantize), which computes in its dtype"
        return None

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root).resolve() / self.run.name

    @property
    def reference_model(self) -> str:
        return self.model.reference or self.model.policy

    @property
    def reference_quantize(self) -> str | None:
        """How the reference stage loads the reference: under QLoRA (train.lora.quantize) quantized as the train
        stage loads its base, so the policy at step 0 and the reference are one model (TRL's QLoRA reference is
        the quantized base with the adapter disabled)."""
        return self.train.lora.quantize if self.train.lora else None

    @property
    def baseline_model(self) -> str:
        return self.evaluate.baseline or self.reference_model

    @property
    def held_out_seed(self) -> int:
        return self.run.seed if self.data.held_out_seed is None else self.data.held_out_seed

    @property
    def models_share_actor(self) -> bool:
        """reference.share_actor, its default resolved: shared where no sampler or scorer asks for a GPU."""
        if self.reference.share_actor is not None:
            return self.reference.share_actor
        return not (self.reference.gpus_per_actor or self.sample.gpus_per_actor)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    # Model validators already prefix their message with the key they check.
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        return msg if ":" in msg.split(" ")[0] else f"{where}: {msg}"
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where or 'config'}: {msg}{extra}"


def build_config(tree: dict) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    # Every round's config must be valid too: check them all before any work starts.
    for k in cfg.rounds.overrides:
        if not 1 <= k <= cfg.rounds.count:
            raise ConfigError(f"rounds.overrides.{k}: round {k} is outside 1..rounds.count ({cfg.rounds.count})")
    for k in range(1, cfg.rounds.count + 1):
        lineage = (f"<round {k - 1} policy>", f"<round {k - 1} reference>", f"<round {k} soft reference>")
        try:
            PipelineConfig.model_validate(_round_tree(cfg, k, *(lineage if k > 1 else ())))
        except ValidationError as err:
            raise ConfigError(f"round {k}: {_one_line(err)}") from None
    return cfg


def _round_tree(cfg: PipelineConfig, k: int, previous_policy: str | None = None,
                previous_reference: str | None = None, soft_reference: str | None = None) -> dict:
    tree = merge(cfg.model_dump(mode="json"), cfg.rounds.overrides.get(k, {}))
    # A round is one round; what it needs of `rounds` (the soft update's alpha) stays.
    tree["rounds"] = RoundsConfig(reference=cfg.rounds.reference,
                                  reference_alpha=cfg.rounds.reference_alpha).model_dump(mode="json")
    tree["evaluate"]["baseline"] = cfg.evaluate.baseline or cfg.reference_model
    if cfg.rounds.kl_budget is not None and "kl_budget" not in cfg.rounds.overrides.get(k, {}).get("train", {}):
        tree["train"]["kl_budget"] = cfg.rounds.kl_budget * k / cfg.rounds.count
    if previous_policy is not None:
        references = {"initial": cfg.reference_model, "previous": previous_policy, "soft": soft_reference}
        tree["model"]["reference"] = references[cfg.rounds.reference]
        tree["model"]["policy"] = previous_policy
        if cfg.rounds.reference != "initial":
            # Self-labels score the previous policy against the reference it was trained against: the implicit
            # reward its own DPO round optimized (the new reference would be the policy itself, or part of it).
            tree["label"]["implicit_reference"] = tree["label"]["implicit_reference"] or previous_reference
        if cfg.rounds.init == "initial":
            tree["train"]["init_from"] = cfg.model.policy
        tree["run"]["seed"] = cfg.run.seed + k - 1
        tree["data"]["held_out_seed"] = cfg.held_out_seed
    return tree


def round_config(cfg: PipelineConfig, k: int, previous_policy: str | None = None,
                 previous_reference: str | None = None, soft_reference: str | None = None) -> PipelineConfig:
    """The config of round k: its overrides applied, sampling from (and training on) the previous policy, against
    the reference rounds.reference names (`soft_reference`: the soft_update stage's folder for this round)."""
    return build_config(_round_tree(cfg, k, previous_policy, previous_reference, soft_reference))


class _StrictLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping, which YAML would silently resolve to the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give a YAML file (e.g. configs/default.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.load(path.read_text(), Loader=_StrictLoader)
        except yaml.YAMLError as err:
            detail = err.problem if isinstance(err, yaml.MarkedYAMLError) and err.problem else err.__class__.__name__
            mark = getattr(err, "problem_mark", None)
            where = f"{path}: line {mark.line + 1}" if mark else str(path)
            if detail.startswith("duplicate key"):
                raise ConfigError(f"{where}: {detail} (YAML would silently keep only the last one)") from None
            raise ConfigError(f"{where}: not valid YAML ({detail})") from None
        if tree is None:
            raise ConfigError(f"{path}: the config file is empty (an empty config is no config file at all)")
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    tree = merge(tree, parse_overrides(overrides or []))
    return build_config(tree)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_resources(cfg: PipelineConfig, total: dict[str, float], largest_node: dict[str, float]) -> None:
    """Raise ConfigError naming the key if a stage asks for more CPUs or GPUs than the Ray cluster has.

    Stages run one after another, so each must fit on its own. Without this check an actor pool or a Ray
    Train worker group that cannot be placed waits forever instead of failing.
    """
    s, r, t = cfg.sample, cfg.reference, cfg.train
    tp = s.tensor_parallel_size if s.backend == "vllm" else 1
    sample_gpus = s.gpus_per_actor if tp == 1 else tp  # a tensor-parallel engine takes one GPU per shard
    requests = [
        # (key, what, per unit, units, CPUs that Ray Data's read and write tasks need beside an actor pool: it
        # starts the actors first, so a pool holding the last CPU leaves those tasks waiting forever)
        ("sample.gpus_per_actor" if tp == 1 else "sample.tensor_parallel_size", "GPU", sample_gpus, s.num_actors, 0),
        ("sample.cpus_per_actor", "CPU", s.cpus_per_actor, s.num_actors, 1),
        ("reference.gpus_per_actor", "GPU", r.gpus_per_actor, r.num_actors, 0),
        ("reference.cpus_per_actor", "CPU", r.cpus_per_actor, r.num_actors, 1),
        ("train.use_gpu", "GPU", 1.0 if t.use_gpu else 0.0, t.num_workers, 0),
        ("train.cpus_per_worker", "CPU", t.cpus_per_worker, t.num_workers, 0),
    ]
    requests += [(f"{section}.resources.{name}", name, each, units, 0)
                 for section, pool, units in (("sample", s.resources, s.num_actors),
                                              ("reference", r.resources, r.num_actors),
                                              ("train", t.resources, t.num_workers))
                 for name, each in pool.items()]
    for key, resource, each, units, task_cpus in requests:
        have, on_one_node = total.get(resource, 0.0), largest_node.get(resource, 0.0)
        if each * units > have + 1e-9:
            raise ConfigError(f"{key}: {units} x {each:g} {resource} = {each * units:g} {resource}, but the Ray "
                              f"cluster has {have:g} (set run.check_resources=false on an autoscaling cluster)")
        if task_cpus and each * units > have - task_cpus + 1e-9:
            raise ConfigError(f"{key}: {units} x {each:g} CPU = {each * units:g} CPU leaves less than the "
                              f"{task_cpus} CPU that Ray Data's read and write tasks need of the cluster's {have:g}")
        if tp == 1 and each > on_one_node + 1e-9:
            raise ConfigError(f"{key}: {each:g} {resource} per process, but no Ray node has more than "
                              f"{on_one_node:g}")


def concurrent_trainings(cfg: PipelineConfig, total: dict[str, float], variants: int) -> int:
    """How many frontier variants train at once: as many whole Ray Train worker groups as the cluster holds
    (at least one, at most frontier.max_concurrent when set)."""
    t = cfg.train
    fits = [math.floor(total.get("CPU", 0.0) / (t.num_workers * t.cpus_per_worker) + 1e-9)]
    if t.use_gpu:
        fits.append(math.floor(total.get("GPU", 0.0) / t.num_workers + 1e-9))
    fits += [math.floor(total.get(name, 0.0) / (t.num_workers * amount) + 1e-9) for name, amount in t.resources.items()]
    return max(1, min(variants, cfg.frontier.max_concurrent or variants, *fits))
