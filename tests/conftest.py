"""Shared fixtures: a tiny random Llama (fp32, eval mode) and the built-in tiny-llama tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

VOCAB = 97
PAD_ID = 0
EOS_ID = 2


def make_tiny_llama(seed: int = 0):
    from dpo_ray.models import tiny_llama

    model = tiny_llama(VOCAB, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID, seed=seed,
                       hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256,
                       # Wider than the default 0.02 so next-token distributions are far from uniform: argmax, top-p
                       # and batch-independence checks then test something.
                       initializer_range=0.3)
    return model.to(torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    model = make_tiny_llama()
    yield model
    model.zero_grad(set_to_none=True)


@pytest.fixture
def llama(tiny_llama):
    """The session model, run on one torch thread, with its gradients cleared after each test.

    Matrices this small are dominated by thread-pool overhead on a busy CPU (one thread is orders of magnitude
    faster here); the previous thread count is restored so other tests in the session are unaffected.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_llama
    finally:
        tiny_llama.zero_grad(set_to_none=True)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from dpo_ray.models import load_tokenizer

    return load_tokenizer("builtin:tiny-llama")


@pytest.fixture()
def reward_model(tmp_path):
    """A randomly initialized one-score reward model on the tiny Llama, with its tokenizer, in a folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from dpo_ray.models import resolve_model

    local = resolve_model("builtin:tiny-llama")
    config = AutoConfig.from_pretrained(local, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(local)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return str(tmp_path / "rm")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Under the whole suite an earlier test may have left this process connected to a cluster (a second ray.init
    # would fail): leave it, and start a cluster of our own, shut down after, so nothing this module starts (its
    # actors, Ray Data's readers) is seen by later modules' clusters.
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def make_reference_parquet(folder: Path, n_pairs: int = 16) -> Path:
    """Random-token pairs of the tiny model's vocabulary with real reference log-probs (scored in-process)."""
    import random

    import pyarrow.parquet as pq

    from dpo_ray import schemas
    from dpo_ray.config import load_config
    from dpo_ray.ops.scorers import LogProbScorer, ScorerSpec

    rng = random.Random(0)
    rows = []
    for i in range(n_pairs):
        prompt = [rng.randrange(100, 5000) for _ in range(rng.randint(3, 8))]
        chosen = [rng.randrange(100, 5000) for _ in range(rng.randint(2, 6))]
        rejected = [rng.randrange(100, 5000) for _ in range(rng.randint(2, 6))]
        rows.append({"pair_id": f"p{i}", "prompt_id": f"q{i}", "prompt": "p", "prompt_ids": prompt,
                     "chosen": f"c{i}", "chosen_ids": chosen, "rejected": f"r{i}", "rejected_ids": rejected,
                     "chosen_reward": 1.0, "rejected_reward": 0.0})
    cfg = load_config("configs/tiny.yaml")
    scorer = LogProbScorer(ScorerSpec.of(cfg, "builtin:tiny-llama",
                                       {"chosen_ids": "ref_chosen_logps", "rejected_ids": "ref_rejected_logps"}))
    table = scorer(schemas.rows_to_table(rows, schemas.PAIRS))
    schemas.check_schema(table, schemas.REFERENCE, "test")
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")
    return folder


@pytest.fixture(scope="session", autouse=True)
def shared_torch_extensions(tmp_path_factory):
    """One folder for DeepSpeed's JIT-built CPU ops across the suite's runs (train._worker_env honours it): each
    run building its own took about a minute per DeepSpeed test."""
    import os

    previous = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    yield
    if previous is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR")
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = previous


def isolated_env() -> dict:
    """Environment for a pipeline subprocess: its own new local Ray cluster and the default MLflow store."""
    import os

    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def sqlite_store(root: Path) -> str:
    """The tracking URI of the MLflow store a run root holds by default."""
    return f"sqlite:///{root / 'mlflow.db'}"


def mlflow_runs(tracking_uri: str, max_results: int = 100) -> tuple:
    """A client of the MLflow store at `tracking_uri` and the runs of its dpo-ray experiment."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dpo-ray")
    return client, client.search_runs([experiment.experiment_id], max_results=max_results)


def the_parent_run(runs: list, note: object = None):
    """The one run without a parent run; asserted to be one, with `note` as the message if it is not."""
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, note or parents
    return parents[0]


def runs_under(parent, runs: list) -> list:
    """The runs whose parent run is `parent`."""
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def check_run_tree(runs: list, children: set[str], stages: Sequence[str] | dict[str, Sequence[str]]) -> dict:
    """One parent run, under it one run per name in `children` (tag dpo_ray.child), under each of those exactly
    one run per stage in `stages` (tag dpo_ray.stage; a dict gives each child its own). Returns the child runs by
    name."""
    parent = the_parent_run(runs)
    by_name = {r.data.tags["dpo_ray.child"]: r for r in runs if "dpo_ray.child" in r.data.tags}
    assert set(by_name) == children
    for child in by_name.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        expected = stages[child.data.tags["dpo_ray.child"]] if isinstance(stages, dict) else stages
        assert sorted(r.data.tags["dpo_ray.stage"] for r in runs_under(child, runs)) == sorted(expected)
    return by_name


# A fenced shell block in the docs that the tests cannot run (it needs a real cloud or GPU cluster) is preceded by
# this marker and a reason; every other block is run verbatim by a test (tests/test_docs_commands.py).
NOT_RUN_MARKER = "<!-- not run by the tests:"


def doc_shell_blocks(doc: Path) -> list[dict]:
    """The ```bash blocks of a Markdown file: {"doc", "line", "text", "not_run": reason or None}."""
    import re

    text = doc.read_text()
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", text, re.S):
        before = text[:match.start()].rstrip().splitlines()
        marker = before[-1] if before and before[-1].startswith(NOT_RUN_MARKER) else None
        blocks.append({"doc": doc.name, "line": text[:match.start()].count("\n") + 1, "text": match.group(1),
                       "not_run": marker[len(NOT_RUN_MARKER):].removesuffix("-->").strip() if marker else None})
    return blocks


def doc_command(doc: Path, starts_with: str) -> str:
    """The one documented command line that starts with `starts_with`, as written (its trailing comment cut)."""
    lines = [line for block in doc_shell_blocks(doc) for line in block["text"].splitlines()
             if line.startswith(starts_with)]
    assert len(lines) == 1, f"{doc.name}: expected one line starting with {starts_with!r}, found {lines}"
    return lines[0].split("  #")[0].rstrip()
