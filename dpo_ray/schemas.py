"""Arrow schemas of every Parquet file the pipeline writes, and the helpers that enforce them.

Token ids travel with the text from the sample stage on, so the reference pass and training score exactly the
tokens that were sampled; nothing downstream re-tokenizes a completion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray.errors import InputError

TOKENS = pa.list_(pa.int32())


def _schema(base: pa.Schema | None = None, /, **columns: pa.DataType) -> pa.Schema:
    """The columns of `base`, if any, then `columns` in the order written (all nullable)."""
    return pa.schema([*(base or []), *columns.items()])


# Normalized prompts (written by the pipeline before sampling). `messages_json` keeps a chat prompt verbatim.
PROMPTS = _schema(prompt_id=pa.string(), prompt=pa.string(), messages_json=pa.string(), split=pa.string())

# sample: one row per completion. `messages_json`: the conversation the sampler rendered, data.system_prompt
# applied (text.sampled_messages_json; null for a plain-text prompt without one), so a reward model or judge is
# shown all of it.
COMPLETIONS = _schema(
    prompt_id=pa.string(),
    prompt=pa.string(), messages_json=pa.string(), prompt_ids=TOKENS,
    sample_index=pa.int32(),
    completion=pa.string(), completion_ids=TOKENS,
    # Sum of the sampling model's untempered log-probs of the completion tokens (vLLM: its raw logprobs).
    sample_logp=pa.float64(),
    finish_reason=pa.string(),
    prompt_truncated=pa.bool_(),
)

# label: completions with their scores (kept so a reader can audit every pair).
# `filter_reward`: label.filter_labeler's score, null when no filter is configured. `reference_token_logp`: the
# implicit labeler's reference log-prob of the completion per token (label.fluency_guard), null for other labelers.
SCORED = _schema(COMPLETIONS, reward=pa.float64(), filter_reward=pa.float64(), reference_token_logp=pa.float64())

# label: preference pairs.
PAIRS = _schema(
    pair_id=pa.string(),
    prompt_id=pa.string(),
    prompt=pa.string(), prompt_ids=TOKENS,
    chosen=pa.string(), chosen_ids=TOKENS,
    rejected=pa.string(), rejected_ids=TOKENS,
    # Null for offline preference data that carries no scores.
    chosen_reward=pa.float64(), rejected_reward=pa.float64(),
)

# reference: pairs plus the reference model's log-probs summed over completion tokens only.
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REFERENCE = _schema(PAIRS, **{name: pa.float64() for name in REFERENCE_COLUMNS})

# reference cache: one row per scored sequence, keyed by its token ids (reference.sequence_key).
REFERENCE_CACHE = _schema(sequence_key=pa.binary(16), logp=pa.float64())

# evaluate's reference-side cache: the baseline's held-out samples with their log-probs under it.
EVAL_REFERENCE = _schema(COMPLETIONS, model=pa.string(), reference_logp=pa.float64())
# Beside it, one file per labeler that reads a completion alone: its reward of each of those samples.
EVAL_REFERENCE_REWARDS = _schema(prompt_id=pa.string(), sample_index=pa.int32(), reward=pa.float64())

# evaluate: one row per held-out sample of either model.
EVAL_SAMPLES = _schema(
    prompt_id=pa.string(),
    prompt=pa.string(),
    model=pa.string(),  # "policy" or "reference"
    sample_index=pa.int32(),
    completion=pa.string(), completion_tokens=pa.int32(),
    finish_reason=pa.string(),  # as in COMPLETIONS: "stop" (ended in EOS) or "length"
    reward=pa.float64(),
    # "reference" here, as in `model`, is the baseline evaluate judges against (cfg.baseline_model: evaluate.baseline,
    # by default the reference model; the initial reference in every round).
    policy_logp=pa.float64(), reference_logp=pa.float64(),
    # evaluate.audit_labelers' rewards of the sample, by labeler name (empty without audits).
    audit_rewards=pa.map_(pa.string(), pa.float64()),
)

# Rows refused by a reader under `on_bad_rows: skip`.
REJECTS = _schema(source=pa.string(), row=pa.int64(), field=pa.string(), reason=pa.string(), raw=pa.string())


class SchemaError(InputError):
    pass


def to_table(columns: Mapping[str, Sequence], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema`; a missing or extra column is a bug, so it raises."""
    names = set(columns)
    expected = set(schema.names)
    if names != expected:
        raise SchemaError(f"columns {sorted(names ^ expected)} do not match the schema {schema.names}")
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def rows_to_table(rows: Sequence[Mapping], schema: pa.Schema) -> pa.Table:
    return to_table({name: [r[name] for r in rows] for name in schema.names}, schema)


def check_schema(table_or_schema: pa.Table | pa.Schema, schema: pa.Schema, where: str | Path) -> None:
    """Raise a SchemaError naming the file and the first column that differs from `schema`."""
    actual = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    for field in schema:
        if field.name not in actual.names:
            raise SchemaError(f"{where}: missing column {field.name!r} ({field.type})")
        got = actual.field(field.name).type
        if got != field.type:
            raise SchemaError(f"{where}: column {field.name!r} has type {got}, expected {field.type}")


def parquet_files(path: str | Path) -> list[str]:
    """A Parquet file, or the part files of a folder in name order; SchemaError where a folder has none."""
    files = sorted(str(p) for p in Path(path).glob("*.parquet")) if Path(path).is_dir() else [str(path)]
    if not files:
        raise SchemaError(f"{path}: no Parquet files (the stage wrote no rows)")
    return files


def _parquet_dataset(path: str | Path) -> pq.ParquetDataset:
    return pq.ParquetDataset(parquet_files(path))


def iter_batches(path: str | Path, columns: Sequence[str], rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """`columns` of a Parquet file or folder of part files, `rows` at a time: memory holds one batch."""
    for file in parquet_files(path):
        yield from pq.ParquetFile(file).iter_batches(batch_size=rows, columns=list(columns))


def check_folder(path: str | Path, schema: pa.Schema) -> None:
    """check_schema on a Parquet file or folder of part files, reading only their footers."""
    check_schema(_parquet_dataset(path).schema, schema, path)


def column_names(path: str | Path) -> list[str]:
    """The columns of a Parquet file or folder of part files, reading only their footers."""
    return _parquet_dataset(path).schema.names


def read_table(path: str | Path, schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file or folder of part files, checked against `schema`; optionally only `columns`."""
    dataset = _parquet_dataset(path)
    check_schema(dataset.schema, schema, path)
    names = list(columns or schema.names)
    return dataset.read(columns=names).cast(pa.schema([schema.field(n) for n in names]))
