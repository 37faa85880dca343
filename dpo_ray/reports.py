"""What a run reports beyond its stage folders: the reward-KL plots, the round and frontier tables, the summary.

Tables and the summary go to the `dpo_ray.report` logger, which prints them as they are (no `[dpo-ray]` prefix).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dpo_ray import artifacts
from dpo_ray.quality import divergence

report = logging.getLogger("dpo_ray.report")


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


def write_frontier_report(points: list[dict], run_dir: Path) -> str:
    """frontier.json, frontier.md (returned) and frontier.png: reward against KL, one line per loss type."""
    artifacts.write_json_atomic(run_dir / "frontier.json", {"points": points})
    lines = ["| variant | loss | beta | policy reward | reference reward | win rate | KL |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['variant']} | {p['loss']} | {p['beta']:g} | {p['policy_reward']:+.3f} | "
              f"{p['reference_reward']:+.3f} | {p['win_rate']:.1%} | {p['kl']:.2f} |" for p in points]
    table = "\n".join(lines)
    (run_dir / "frontier.md").write_text(table + "\n")
    plot_reward_vs_kl(
        [{"label": "reference", "kl": 0.0, "reward": points[0]["reference_reward"]}]
        + [{"label": f"{p['loss']} beta={p['beta']:g}", "kl": p["kl"], "kl_stderr": p["kl_stderr"],
            "reward": p["policy_reward"], "reward_stderr": p["policy_reward_stderr"]} for p in points],
        run_dir / "frontier.png", "reward-KL frontier (held-out prompts)",
    )
    return table


# Text quality per round (evaluate's quality measures): rounds.json key suffix, rounds.md column, its format.
ROUND_QUALITY = (("fluency", "fluency", "{:.2f}"), ("distinct_2", "distinct-2", "{:.3f}"),
                 ("non_dictionary_share", "non-dictionary", "{:.1%}"), ("on_task_share", "on task", "{:.0%}"),
                 ("eos_share", "EOS", "{:.0%}"))


def _round_row(r: dict, previous: dict | None, tolerance: float) -> dict:
    """One round's rounds.json entry; the quality measures as policy_<name> and initial_<name> (the baseline), each
    audit's win rate, and the divergence reasons against the baseline and the round before (quality.divergence)."""
    m, lab = r["metrics"], r["label"]
    row = {"round": r["round"], "policy_reward": m["policy_reward"], "initial_reward": m["reference_reward"],
           "win_rate_vs_initial": m["win_rate"], "kl_to_initial": m["kl"], "pairs": lab.get("pairs"),
           "tie_rate": lab.get("ties_dropped", 0) / max(lab.get("prompts", 0), 1)}
    for name, _, _ in ROUND_QUALITY:
        row[f"policy_{name}"] = m.get(f"policy_{name}", float("nan"))
        row[f"initial_{name}"] = m.get(f"reference_{name}", float("nan"))
    row.update({k: v for k, v in m.items() if k.startswith("audit_") and k.endswith(("_win_rate", "_reward"))})
    row["divergence"] = divergence(m, previous, tolerance)
    return row


def _quality_cells(row: dict, who: str) -> str:
    return " | ".join(fmt.format(row[f"{who}_{name}"]) for name, _, fmt in ROUND_QUALITY)


def _audits(rows: list[dict]) -> list[str]:
    return sorted({k[len("audit_"):-len("_win_rate")] for r in rows for k in r
                   if k.startswith("audit_") and k.endswith("_win_rate")})


def write_round_report(rounds: list[dict], run_dir: Path, tolerance: float = 0.25) -> str:
    """rounds.json, rounds.md (the table, also returned) and rounds.png: each round against the initial model.

    The quality columns (evaluate's text-quality measures; fluency is the mean per-token log-prob under the initial
    model) are each round's policy's, and the initial model's in the last row (round 1's evaluation of it). An audit
    labeler's win rate gets a column of its own; `divergence` lists what quality.divergence flagged in the round."""
    rows = [_round_row(r, rounds[i - 1]["metrics"] if i else None, tolerance) for i, r in enumerate(rounds)]
    artifacts.write_json_atomic(run_dir / "rounds.json", {"rounds": rows})
    audits = _audits(rows)
    header = ("| round | policy reward | initial reward | win rate vs initial | KL to initial | pairs | tie rate | "
              + " | ".join([column for _, column, _ in ROUND_QUALITY] + [f"{a} win rate" for a in audits])
              + " | divergence |")
    lines = [header, "|---|---|---|---|---|---|---|" + "---|" * (len(ROUND_QUALITY) + len(audits) + 1)]
    for r in rows:
        audit_cells = "".join(f" {r.get(f'audit_{a}_win_rate', float('nan')):.1%} |" for a in audits)
        lines.append(f"| {r['round']} | {r['policy_reward']:+.3f} | {r['initial_reward']:+.3f} | "
                     f"{r['win_rate_vs_initial']:.1%} | {r['kl_to_initial']:.2f} | {r['pairs']} | "
                     f"{r['tie_rate']:.1%} | "
                     f"{_quality_cells(r, 'policy')} |{audit_cells} {'; '.join(r['divergence']) or 'none'} |")
    lines.append(f"| initial model | | {rows[0]['initial_reward']:+.3f} | | | | | "
                 f"{_quality_cells(rows[0], 'initial')} |" + " |" * len(audits) + " |")
    table = "\n".join(lines)
    (run_dir / "rounds.md").write_text(table + "\n")
    plot_reward_vs_kl(
        [{"label": "initial", "kl": 0.0, "reward": rows[0]["initial_reward"]}]
        + [{"label": f"round {r['round']}", "kl": r["kl_to_initial"], "reward": r["policy_reward"]} for r in rows],
        run_dir / "rounds.png", "round over round, against the initial model",
    )
    return table


def print_summary(summary: dict) -> None:
    m = summary["metrics"]
    lines = [
        f"\n[dpo-ray] finished ({summary['rounds']} round{'s' if summary['rounds'] > 1 else ''})",
        f"  run dir:        {summary['run_dir']}",
        f"  trained policy: {summary['policy']}",
        f"  held-out reward (last round): policy {m['policy_reward']:+.3f} vs reference {m['reference_reward']:+.3f}; "
        f"win rate {m['win_rate']:.1%}; KL {m['kl']:.2f} nats; implicit accuracy {m['implicit_accuracy']:.1%}",
        "  held-out text (policy vs reference): " + "; ".join(
            f"{column} {fmt.format(m.get('policy_' + name, float('nan')))} vs "
            f"{fmt.format(m.get('reference_' + name, float('nan')))}" for name, column, fmt in ROUND_QUALITY),
    ]
    lines += [f"  audit {name}: policy {m[f'audit_{name}_policy_reward']:+.3f} vs reference "
              f"{m[f'audit_{name}_reference_reward']:+.3f}; win rate {m[f'audit_{name}_win_rate']:.1%}"
              for name in _audits([m])]
    lines += [f"  divergence: {reason}" for reason in m.get("divergence_reasons", [])]
    lines.append(f"  MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
    if summary["tracking_uri"].startswith("sqlite:///"):
        lines.append(f"  view it: mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1")
    report.info("\n".join(lines))
