"""What determines each stage's output: the inputs its manifest key is a hash of (artifacts.input_key).

`dpo-ray run` passes the upstream stages' manifest `output_digest`s; the stage commands (`dpo-ray label
--completions DIR ...`) pass `source_digest` of the folders and files they are given. Both key on contents, never
on paths, so an edited prompt file, a re-sampled completions folder or a retrained policy is never mistaken for
the one a stage already consumed.
"""

from __future__ import annotations

from pathlib import Path

from dpo_ray import artifacts
from dpo_ray.config import PipelineConfig
from dpo_ray.errors import InputError
from dpo_ray.models import model_fingerprint


def source_digest(path: str | Path, what: str) -> str:
    """Digest of an input file or folder; `what` names it (a config key or a CLI option) if it is missing."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what}: {path} does not exist")
    return artifacts.folder_digest(p) if p.is_dir() else artifacts.file_digest(p)


def _policy(cfg: PipelineConfig) -> dict:
    return {"seed": cfg.run.seed, "dtype": cfg.model.dtype, "policy": model_fingerprint(cfg.model.policy)}


def _limits(cfg: PipelineConfig) -> dict:
    return {k: getattr(cfg.data, k) for k in ("max_prompt_tokens", "max_completion_tokens", "prompt_truncation",
                                              "system_prompt")}


def _labeler_fingerprints(cfg: PipelineConfig) -> dict:
    lab = cfg.label
    models = {}
    if "reward_model" in (lab.labeler, lab.filter_labeler):
        models["reward_model"] = model_fingerprint(lab.reward_model)
    if lab.labeler == "implicit":
        models["policy"] = model_fingerprint(lab.implicit_policy or cfg.model.policy)
        models["reference"] = model_fingerprint(lab.implicit_reference or cfg.reference_model)
    return models


def sample(cfg: PipelineConfig) -> dict:
    return {**_policy(cfg), "prompts": source_digest(cfg.data.prompts, "data.prompts"),
            "data": cfg.data.model_dump(), "sample": cfg.sample.model_dump()}


def import_preferences(cfg: PipelineConfig) -> dict:
    d = cfg.data
    return {**_policy(cfg), "preferences": source_digest(d.preferences, "data.preferences"),
            "limits": _limits(cfg), "on_bad_rows": d.on_bad_rows}


def label(cfg: PipelineConfig, completions_digest: str) -> dict:
    return {"completions": completions_digest, "label": cfg.label.model_dump(),
            "labeler_models": _labeler_fingerprints(cfg)}


def reference(cfg: PipelineConfig, pairs_digest: str) -> dict:
    return {"pairs": pairs_digest, "reference": model_fingerprint(cfg.reference_model), "dtype": cfg.model.dtype,
            "limits": _limits(cfg)}


def train(cfg: PipelineConfig, reference_digest: str) -> dict:
    init = cfg.train.init_from
    return {**_policy(cfg), "reference": reference_digest, "train": cfg.train.model_dump(),
            "init": model_fingerprint(init) if init else None}


def evaluate(cfg: PipelineConfig, policy_digest: str, baseline: str, prompts_digest: str | None) -> dict:
    judge = cfg.evaluate.labeler or cfg.label.labeler
    return {"policy": policy_digest, "baseline": model_fingerprint(baseline), "prompts": prompts_digest,
            "seed": cfg.run.seed, "dtype": cfg.model.dtype, "limits": _limits(cfg),
            "evaluate": cfg.evaluate.model_dump(), "sample": cfg.sample.model_dump(),
            "labeler": cfg.label.model_dump(),
            "reward_model": model_fingerprint(cfg.label.reward_model) if judge == "reward_model" else None,
            "beta": cfg.train.beta}
