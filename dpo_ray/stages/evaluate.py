"""evaluate: the trained policy against the reference on held-out prompts.

Both models sample `samples_per_prompt` completions per held-out prompt (temperature 1 by default); every
sample is scored by the labeler and by both models' log-probs (the training forward code, or for a sample's own
model with the transformers backend, the sampler's identical log-prob). Reported:
- mean reward of each model, and the policy's win rate: sample i of the policy against sample i of the
  reference on the same prompt, ties counting one half;
- KL(pi || pi_ref) per sequence, the Monte-Carlo mean of log pi(y|x) - log pi_ref(y|x) over policy samples;
- implicit-reward accuracy on held-out pairs: among each prompt's samples of both models, the best and worst
  under the labeler form a pair, and the policy's implicit reward beta*log(pi/pi_ref) should rank them alike.
Writes eval_samples.parquet, metrics.json, reward_vs_kl.png and examples.md.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from dpo_ray import schemas
from dpo_ray.config import PipelineConfig
from dpo_ray.pairs import build_pairs
from dpo_ray.stages.label import add_rewards, check_labeler
from dpo_ray.stages.reference import completion_logps_column
from dpo_ray.stages.sample import read_split, sample_dataset


def _stderr(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def compute_metrics(rows: list[dict], beta: float) -> dict:
    """Metrics from EVAL_SAMPLES rows (pure; unit-tested)."""
    by_model = defaultdict(list)
    samples = defaultdict(dict)
    for r in rows:
        by_model[r["model"]].append(r)
        samples[r["prompt_id"]][(r["model"], r["sample_index"])] = r
    policy_rewards = [r["reward"] for r in by_model["policy"]]
    reference_rewards = [r["reward"] for r in by_model["reference"]]
    wins = []
    for per_prompt in samples.values():
        for (model, index), r in per_prompt.items():
            other = per_prompt.get(("reference", index))
            if model == "policy" and other is not None:
                wins.append(1.0 if r["reward"] > other["reward"] else 0.5 if r["reward"] == other["reward"] else 0.0)
    kl_terms = [r["policy_logp"] - r["reference_logp"] for r in by_model["policy"]]
    correct = []
    for per_prompt in samples.values():
        items = list(per_prompt.values())
        pairs, _ = build_pairs([r["completion"] for r in items], [r["reward"] for r in items])
        for c, j in pairs:
            implicit = [beta * (items[i]["policy_logp"] - items[i]["reference_logp"]) for i in (c, j)]
            correct.append(float(implicit[0] > implicit[1]))
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {
        "policy_reward": mean(policy_rewards),
        "policy_reward_stderr": _stderr(policy_rewards),
        "reference_reward": mean(reference_rewards),
        "reference_reward_stderr": _stderr(reference_rewards),
        "win_rate": mean(wins),
        "win_rate_stderr": _stderr(wins),
        "kl": mean(kl_terms),
        "kl_stderr": _stderr(kl_terms),
        "implicit_accuracy": mean(correct),
        "held_out_pairs": len(correct),
        "eval_prompts": len(samples),
        "policy_completion_tokens": mean([r["completion_tokens"] for r in by_model["policy"]]),
        "reference_completion_tokens": mean([r["completion_tokens"] for r in by_model["reference"]]),
    }


def plot_reward_vs_kl(points: list[dict], path: Path, title: str) -> None:
    """points: {label, kl, kl_stderr, reward, reward_stderr}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p in points:
        ax.errorbar(p["kl"], p["reward"], xerr=p.get("kl_stderr") or 0, yerr=p.get("reward_stderr") or 0,
                    fmt="o", capsize=3, label=p["label"])
    ax.set_xlabel("sequence KL(policy || reference), nats")
    ax.set_ylabel("mean reward on held-out prompts")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _examples_markdown(rows: list[dict], count: int) -> str:
    by_prompt = defaultdict(dict)
    for r in rows:
        if r["sample_index"] == 0:
            by_prompt[r["prompt_id"]][r["model"]] = r
    lines = ["# Example completions (sample 0 of each model)", ""]
    for prompt_id in sorted(by_prompt)[:count]:
        pair = by_prompt[prompt_id]
        if len(pair) < 2:
            continue
        lines += [f"## {prompt_id}: {pair['policy']['prompt']}", ""]
        for model in ("reference", "policy"):
            text = pair[model]["completion"].replace("\n", " ")
            lines.append(f"- **{model}** (reward {pair[model]['reward']:+.3f}): {text}")
        lines.append("")
    return "\n".join(lines)


def run(cfg: PipelineConfig, prompts_path: str, policy_path: str, out_dir: str, baseline: str | None = None) -> dict:
    """Judge `policy_path` against `baseline` (default: the reference model) on the held-out prompts."""
    e, s = cfg.evaluate, cfg.sample
    reference = baseline or cfg.reference_model
    max_new = e.max_new_tokens or s.max_new_tokens
    check_labeler(cfg, e.labeler or cfg.label.labeler)
    eval_prompts = read_split(prompts_path, "eval")
    # Each model-holding step is materialized before the next starts, so a small node never has to fit
    # every actor pool at once. Where the sampler's log-prob is exact, each model scores only the other's samples.
    models = {"policy": policy_path, "reference": reference}
    sampled = {}
    for name, spec in models.items():
        ds = sample_dataset(eval_prompts, cfg, spec, e.samples_per_prompt, max_new, e.temperature, cfg.run.seed + 1)
        sampled[name] = ds.map_batches(lambda b, name=name: b.append_column("model", pa.array([name] * b.num_rows)),
                                       batch_format="pyarrow").materialize()
    scored = []
    for name, other in (("policy", "reference"), ("reference", "policy")):
        ds = completion_logps_column(sampled[name], cfg, models[name], f"{name}_logp", sampled_by=models[name])
        scored.append(completion_logps_column(ds, cfg, models[other], f"{other}_logp", sampled_by=models[name]))
    samples = add_rewards(scored[0].union(scored[1]), cfg, e.labeler or cfg.label.labeler)

    def to_eval_schema(b: pa.Table) -> pa.Table:
        b = b.append_column("completion_tokens", pa.compute.list_value_length(b["completion_ids"]).cast(pa.int32()))
        return b.select(schemas.EVAL_SAMPLES.names).cast(schemas.EVAL_SAMPLES)

    samples.map_batches(to_eval_schema, batch_format="pyarrow").write_parquet(str(Path(out_dir) / "eval_samples"))
    rows = schemas.read_table(Path(out_dir) / "eval_samples", schemas.EVAL_SAMPLES).to_pylist()
    metrics = compute_metrics(rows, cfg.train.beta)
    out = Path(out_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_reward_vs_kl(
        [{"label": "reference", "kl": 0.0, "reward": metrics["reference_reward"],
          "reward_stderr": metrics["reference_reward_stderr"]},
         {"label": f"DPO policy (beta={cfg.train.beta}, {cfg.train.loss})", "kl": metrics["kl"],
          "kl_stderr": metrics["kl_stderr"], "reward": metrics["policy_reward"],
          "reward_stderr": metrics["policy_reward_stderr"]}],
        out / "reward_vs_kl.png", f"{cfg.run.name}: win rate {metrics['win_rate']:.0%}",
    )
    (out / "examples.md").write_text(_examples_markdown(rows, e.num_examples))
    return metrics


def main(argv: list[str] | None = None) -> None:
    from dpo_ray.cli import stage_entry

    stage_entry("evaluate", argv)


if __name__ == "__main__":
    main()
