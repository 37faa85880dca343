"""reports.write_round_report on hand-made round results: the table and rounds.json carry the text quality."""

from __future__ import annotations

import json
import math

from dpo_ray.reports import write_round_report


def metrics(reward, fluency, distinct_2, non_dictionary, on_task, eos):
    quality = {"fluency": fluency, "distinct_2": distinct_2, "non_dictionary_share": non_dictionary,
               "on_task_share": on_task, "eos_share": eos}
    initial = {"fluency": -2.5, "distinct_2": 0.9, "non_dictionary_share": 0.03, "on_task_share": 0.9,
               "eos_share": 0.2}
    return {"policy_reward": reward, "reference_reward": 0.1, "win_rate": 0.75, "kl": 4.0,
            **{f"policy_{k}": v for k, v in quality.items()}, **{f"reference_{k}": v for k, v in initial.items()}}


def test_round_report_has_quality_columns(tmp_path):
    label = {"pairs": 90, "ties_dropped": 6, "prompts": 96}
    rounds = [{"round": 1, "metrics": metrics(0.6, -3.1, 0.83, 0.027, 0.84, 0.1), "label": label},
              {"round": 2, "metrics": metrics(0.9, -5.75, 0.412, 0.25, 0.5, 0.0), "label": label}]
    table = write_round_report(rounds, tmp_path)
    lines = table.splitlines()
    assert "fluency | distinct-2 | non-dictionary | on task | EOS |" in lines[0]
    assert lines[2].startswith("| 1 | +0.600 |") and lines[2].endswith("| -3.10 | 0.830 | 2.7% | 84% | 10% | none |")
    assert lines[3].startswith("| 2 | +0.900 |") and "| -5.75 | 0.412 | 25.0% | 50% | 0% | fluency -5.75" in lines[3]
    assert lines[4] == "| initial model | | +0.100 | | | | | -2.50 | 0.900 | 3.0% | 90% | 20% | |"
    assert (tmp_path / "rounds.md").read_text() == table + "\n"
    rows = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert rows[1]["policy_distinct_2"] == 0.412 and rows[1]["initial_distinct_2"] == 0.9
    assert rows[0]["policy_on_task_share"] == 0.84 and rows[0]["initial_fluency"] == -2.5
    assert rows[0]["divergence"] == []
    assert [r.split(" ")[0] for r in rows[1]["divergence"]] == [
        "fluency", "distinct_2", "on_task_share", "non_dictionary_share"]
    assert (tmp_path / "rounds.png").is_file()


def test_round_report_without_quality_metrics(tmp_path):
    """A round whose metrics lack the quality measures reports them as NaN rather than failing."""
    m = {"policy_reward": 0.5, "reference_reward": 0.1, "win_rate": 0.5, "kl": 1.0}
    write_round_report([{"round": 1, "metrics": m, "label": {}}], tmp_path)
    row = json.loads((tmp_path / "rounds.json").read_text())["rounds"][0]
    assert math.isnan(row["policy_fluency"]) and math.isnan(row["initial_on_task_share"])


def test_round_report_shows_audits_and_flags_an_audit_that_falls(tmp_path):
    """Round 2's training win rate rises while the judge audit's falls: flagged against round 1, not round 1 itself
    (whose audit win rate, 0.7, is above the initial model's 0.5)."""
    label = {"pairs": 90, "ties_dropped": 0, "prompts": 96}
    good = (0.6, -2.5, 0.9, 0.03, 0.9, 0.2)
    rounds = [{"round": 1, "metrics": {**metrics(*good), "audit_judge_win_rate": 0.7}, "label": label},
              {"round": 2, "metrics": {**metrics(*good), "win_rate": 0.9, "audit_judge_win_rate": 0.55},
               "label": label}]
    table = write_round_report(rounds, tmp_path)
    lines = table.splitlines()
    assert lines[0].endswith("| judge win rate | divergence |")
    assert lines[2].endswith("| 70.0% | none |")
    assert lines[3].endswith("| 55.0% | audit_judge_win_rate fell 70% -> 55% while win_rate rose 75% -> 90% |")
    rows = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert rows[1]["audit_judge_win_rate"] == 0.55 and len(rows[1]["divergence"]) == 1
