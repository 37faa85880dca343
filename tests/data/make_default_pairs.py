"""Writes tests/data/default_pairs.parquet: the embedded default's round-1 preference pairs with their reference
log-probs, as its sample, label and reference stages make them (configs/default.yaml: SmolLM2 sampling movie
reviews, VADER labeling). The slow LoRA test trains on part of them and checks the held-out rest, without
sampling 96 prompts in every test run. Deterministic: the stages are seeded. About 4 minutes on 2 cores.

    .venv/bin/python tests/data/make_default_pairs.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from dpo_ray import schemas

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_reward", "rejected_reward",
           *schemas.REFERENCE_COLUMNS]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = [f"run.root={tmp}/runs"]
        stage = lambda *args: subprocess.run(  # noqa: E731
            [str(Path(sys.executable).with_name("dpo-ray")), *args, "--config", "configs/default.yaml", *run],
            cwd=REPO, check=True)
        stage("sample", "--out", f"{tmp}/sample")
        stage("label", "--completions", f"{tmp}/sample/completions", "--out", f"{tmp}/label")
        stage("reference", "--pairs", f"{tmp}/label/pairs", "--out", f"{tmp}/reference")
        table = schemas.read_table(f"{tmp}/reference", schemas.REFERENCE, columns=COLUMNS).sort_by("pair_id")
        pq.write_table(table, HERE / "default_pairs.parquet")
        print(f"wrote {HERE / 'default_pairs.parquet'}: {table.num_rows} pairs")


if __name__ == "__main__":
    main()
