"""What determines a stage's output: the pieces its `inputs(cfg, digests)` puts in the manifest key
(artifacts.input_key), shared here by the stages.

Upstream data enters a key as `digest(path)`, one function for `dpo-ray run` and the stage commands (`dpo-ray label
--completions DIR ...`), so both key the same input the same way and on contents, never on paths: an edited prompt
file, a re-sampled completions folder or a retrained policy is never mistaken for the one a stage already consumed.
"""

from __future__ import annotations

from pathlib import Path

from dpo_ray import artifacts
from dpo_ray.config import PipelineConfig
from dpo_ray.errors import InputError
from dpo_ray.inputs import is_hub_id
from dpo_ray.models import inference_dtype, model_fingerprint


def digest(path: str | Path | list, what: str) -> str:
    """Digest of an input file or folder (or of a list of them, in order); `what` names it (a config key or a CLI
    option) if it is missing.

    Inside a published stage folder the manifest's recorded digest is used while the files' sizes and
    modification times still match it (artifacts.recorded_digest), so a pipeline never hashes twice what it wrote.
    """
    if isinstance(path, list):
        return artifacts.input_key({"digests": [digest(p, what) for p in path]})
    p = Path(path)
    if not p.exists():
        if isinstance(path, str) and is_hub_id(path):
            # A hub dataset is keyed by its name (its split is in the stage's settings): an update on the hub is
            # not noticed; a folder saved with save_to_disk is keyed by contents.
            return artifacts.input_key({"hub_dataset": path})
        raise InputError(f"{what}: {path} does not exist")
    return artifacts.recorded_digest(p) or (artifacts.folder_digest(p) if p.is_dir() else artifacts.file_digest(p))


# Config keys added after run folders were made, by section: left out of a stage key while at their default, so
# those folders keep their keys and are not recomputed by the upgrade.
ADDED_LATER = {"label": ("judge_model", "judge_rubric", "judge_tie_margin", "fluency_guard"),
               "train": ("kl_budget", "kl_probe_prompts", "simpo_gamma", "length_normalize",
                         "gradient_checkpointing", "offload_optimizer",
                         "lora", "lora.quantize"),
               "evaluate": ("audit_labelers", "quality_tolerance"),
               "data": ("split", "columns", "held_out_seed")}


def settings(cfg: PipelineConfig, section: str) -> dict:
    """A config section as a stage key holds it (ADDED_LATER keys at their default left out; a dotted one,
    "lora.quantize", is a key of a subsection, left out of that subsection's settings)."""
    model = getattr(cfg, section)
    out = _without_defaults(model, ADDED_LATER.get(section, ()))
    for name in ADDED_LATER.get(section, ()):
        parent, _, child = name.partition(".")
        if child and isinstance(out.get(parent), dict):
            out[parent] = _without_defaults(getattr(model, parent), (child,))
    return out


def _without_defaults(model, later) -> dict:
    fields = type(model).model_fields
    return {name: value for name, value in model.model_dump().items()
            if name not in later or value != fields[name].get_default(call_default_factory=True)}


def reading(cfg: PipelineConfig) -> dict:
    """How data.prompts / data.preferences are read beyond their contents (data.split, data.columns), each left
    out at its default."""
    return {name: value for name, value in settings(cfg, "data").items() if name in ("split", "columns")}


def held_out_prompts(cfg: PipelineConfig, digests: dict[str, str]) -> str:
    """The key of a stage's held-out prompts and how they are sampled: the prompts file it was given, or else
    data.prompts as it is read (data.split, data.columns); with data.held_out_seed set, that seed too."""
    if digests.get("prompts"):
        prompts = digests["prompts"]
    else:
        read = digest(cfg.data.prompts, "data.prompts")
        prompts = artifacts.input_key({"prompts": read, **reading(cfg)}) if reading(cfg) else read
    seed = cfg.data.held_out_seed
    return prompts if seed is None else artifacts.input_key({"prompts": prompts, "held_out_seed": seed})


def policy(cfg: PipelineConfig, trains: bool = False) -> dict:
    """The initial policy as a stage runs it: in model.dtype where it `trains`, else in its inference dtype."""
    dtype = cfg.model.dtype if trains else inference_dtype(cfg.model.dtype)
    return {"seed": cfg.run.seed, "dtype": dtype, "policy": model_fingerprint(cfg.model.policy)}


def limits(cfg: PipelineConfig) -> dict:
    return {k: getattr(cfg.data, k) for k in ("max_prompt_tokens", "max_completion_tokens", "prompt_truncation",
                                              "system_prompt")}


def judge_fingerprint(cfg: PipelineConfig) -> str:
    """The judge labeler's model: label.judge_model, or the policy itself (self-rewarding) when unset."""
    return model_fingerprint(cfg.label.judge_model or cfg.model.policy)


def labeler_fingerprints(cfg: PipelineConfig) -> dict:
    lab = cfg.label
    models = {}
    if "reward_model" in (lab.labeler, lab.filter_labeler):
        models["reward_model"] = model_fingerprint(lab.reward_model)
    if "judge" in (lab.labeler, lab.filter_labeler):
        models["judge"] = judge_fingerprint(cfg)
    if lab.labeler == "implicit":
        models["policy"] = model_fingerprint(lab.implicit_policy or cfg.model.policy)
        models["reference"] = model_fingerprint(lab.implicit_reference or cfg.reference_model)
    return models
