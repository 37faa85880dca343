"""MLflow: one parent run per pipeline run (reused on rerun), a nested run per stage.

The tracking store defaults to sqlite under the runs root, with artifacts beside it in <root>/mlartifacts;
$MLFLOW_TRACKING_URI or run.tracking_uri override it. Logged params are the flattened, resolved config with
secret-looking names redacted, on the parent when it is created; a stage run's params are the inputs its
manifest key hashes (its config sections, upstream digests), so a stage rerun after a config change shows the
values it ran with. MLflow never lets a run's param change value: a rerun tags the parent with what changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import yaml

from dpo_ray.config import PipelineConfig

log = logging.getLogger(__name__)

RUN_DIR_TAG = "dpo_ray.run_dir"
# The parent run is found by a hash of the run dir, never by the path itself: a filter string built from user
# text breaks on a quote and could be made to match another run.
RUN_KEY_TAG = "dpo_ray.run_dir_key"
_SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "credential", "credentials", "apikey"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("auth", "token")}
REDACTED = "***"
# Opens the experiment in the UI's model-training view instead of the GenAI one (MLflow 3's experiment kinds).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
CHANGED_PARAMS_TAG = "dpo_ray.params_changed_since_first_run"
# On every run below the parent (stages, rounds, variants): the parent's run-dir key, so a rerun finds the runs that
# a killed driver left RUNNING.
UNDER_KEY_TAG = "dpo_ray.under_run_dir_key"
# On every stage run: a hash of the folder it writes, so the next run into that folder finds one its process could
# not end (killed, or the store unwritable at the time).
OUTPUT_KEY_TAG = "dpo_ray.output_key"
ENDED_BY_TAG = "dpo_ray.ended_by"


def tracking_uri(cfg: PipelineConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    root = Path(cfg.run.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def looks_secret(key: str) -> bool:
    """Whole words only: `hf_token` and `AWS_SECRET_ACCESS_KEY` are secrets, `max_new_tokens` is not."""
    words = [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]
    return bool(_SECRET_WORDS.intersection(words)) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def redact(tree: dict) -> dict:
    """A copy of a config tree with the values of secret-looking keys replaced."""
    return {k: redact(v) if isinstance(v, dict) else (REDACTED if looks_secret(k) and v is not None else v)
            for k, v in tree.items()}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_params(tree: dict) -> dict[str, str]:
    """A nested tree as MLflow params: dotted keys, values as text cut to MLflow's 500-character limit."""
    return {k: str(v)[:500] for k, v in flatten(tree).items()}


def numeric(stats: dict) -> dict:
    return {k: float(v) for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    def __init__(self, cfg: PipelineConfig):
        import mlflow

        self.mlflow = mlflow
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        self._open_experiment()
        self.config_tree = redact(cfg.model_dump(mode="json"))
        self.params = as_params(self.config_tree)

    def _open_experiment(self) -> None:
        from mlflow.exceptions import MlflowException

        name = self.cfg.run.experiment
        experiment = self.mlflow.get_experiment_by_name(name)
        if experiment is None:
            # A local store keeps its artifacts under the run root; MLflow's default is ./mlruns of whatever
            # directory the driver happens to run in. A tracking server decides for itself.
            local = self.uri.startswith("sqlite:") or "://" not in self.uri
            location = (Path(self.cfg.run.root).resolve() / "mlartifacts").as_uri() if local else None
            try:
                self.mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
            except MlflowException:
                pass  # created by another driver meanwhile
            experiment = self.mlflow.get_experiment_by_name(name)
        if experiment.tags.get(EXPERIMENT_KIND[0]) is None:
            self.mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        self.mlflow.set_experiment(experiment_id=experiment.experiment_id)

    def _existing_parent(self) -> str | None:
        found = self.mlflow.search_runs(
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{self._run_key()}'", max_results=1,
            order_by=["attributes.start_time ASC"], output_format="list",
        )
        return found[0].info.run_id if found else None

    def _run_key(self) -> str:
        return hashlib.sha256(str(self.cfg.run_dir).encode()).hexdigest()[:32]

    def _end_orphans(self, tag: str, key: str) -> None:
        """Runs tagged `tag` = `key` that are still RUNNING end KILLED: the process that had them open could not end
        them (killed without unwinding, or the store unwritable then), which is why their run dir or output folder
        is being run again. One process per run dir and per output folder is assumed, as for the stage folders."""
        client = self.mlflow.MlflowClient()
        orphans = self.mlflow.search_runs(filter_string=f"tags.`{tag}` = '{key}' and attributes.status = 'RUNNING'",
                                          output_format="list", max_results=1000)
        for run in orphans:
            client.set_tag(run.info.run_id, ENDED_BY_TAG, "a rerun: the process running it could not end it")
            client.set_terminated(run.info.run_id, "KILLED")
        if orphans:
            log.info(f"MLflow: {len(orphans)} run(s) left RUNNING by an earlier process marked KILLED")

    @contextmanager
    def parent(self):
        """The pipeline's parent run: created once per run dir, reused (not duplicated) on every rerun."""
        run_id = self._existing_parent()
        with self.mlflow.start_run(run_id=run_id, run_name=None if run_id else self.cfg.run.name) as run:
            if run_id is None:
                self.mlflow.set_tags({RUN_DIR_TAG: str(self.cfg.run_dir), RUN_KEY_TAG: self._run_key()})
                self.mlflow.log_params(self.params)
            else:
                self._end_orphans(UNDER_KEY_TAG, self._run_key())
                first = run.data.params
                changed = sorted(k for k, v in self.params.items() if first.get(k) != v)
                self.mlflow.set_tag(CHANGED_PARAMS_TAG, ", ".join(changed)[:5000] or "none")
            self.mlflow.log_text(yaml.safe_dump(self.config_tree, sort_keys=False), "config.yaml")
            yield run

    @contextmanager
    def stage(self, name: str, inputs: dict, output: Path):
        """A run for one stage execution into `output`, nested under the active run (the pipeline's, its round's or
        variant's)."""
        output_key = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:32]
        self._end_orphans(OUTPUT_KEY_TAG, output_key)
        with self.mlflow.start_run(run_name=name, nested=self.mlflow.active_run() is not None) as run:
            self.mlflow.set_tags({"dpo_ray.stage": name, UNDER_KEY_TAG: self._run_key(), OUTPUT_KEY_TAG: output_key})
            self.mlflow.log_params(as_params(redact(inputs)))
            yield run.info.run_id

    @contextmanager
    def child(self, name: str):
        """A nested run under the active one, reused by name on rerun (a round of a multi-round run)."""
        parent = self.mlflow.active_run().info.run_id
        found = self.mlflow.search_runs(
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`dpo_ray.child` = '{name}'",
            max_results=1, output_format="list",
        )
        run_id = found[0].info.run_id if found else None
        with self.mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=True) as run:
            self.mlflow.set_tags({"dpo_ray.child": name, UNDER_KEY_TAG: self._run_key()})
            yield run

    def log_stage(self, stats: dict, folder: Path) -> None:
        self.mlflow.log_metrics(numeric(stats))
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in (".json", ".png", ".md", ".yaml"):
                self.mlflow.log_artifact(str(path))
            elif path.is_dir() and (path / "config.json").is_file() and self.cfg.run.log_model:
                self.log_model(path)

    def log_model(self, folder: Path) -> None:
        """A trained model folder as a transformers model of the active run (listed under the run in the UI)."""
        import torch
        import transformers

        from dpo_ray.models import skip_unused_imports

        skip_unused_imports()
        # Given explicitly: MLflow's own inference imports torchvision, which this environment does not have.
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
        self.mlflow.transformers.log_model(
            transformers_model=str(folder), name=folder.name, task="text-generation",
            registered_model_name=self.cfg.run.registered_model, pip_requirements=requirements)

    def log_skip(self, name: str) -> None:
        if self.mlflow.active_run():
            self.mlflow.set_tag(f"dpo_ray.skipped.{name}", "manifest matched")


def prepare_model_logging() -> None:
    """Start importing, on a thread, what Tracker.log_model will import, for a stage whose driver mostly waits
    (train waits on Ray Train). MLflow's transformers flavor imports peft to ask whether the model is an adapter,
    and peft imports bitsandbytes where it is installed ([qlora], [dev]), which runs torch.compile's imports:
    2.3-2.5 s of log_model's 4-5 s on two cores, paid after training by every train stage. Not a daemon: a stage
    that fails meanwhile exits after the imports, not inside them (interpreter shutdown under a running import
    can crash in an extension module and change the exit code)."""
    threading.Thread(target=_import_model_logging, name="dpo-ray-import-model-logging").start()


def _import_model_logging() -> None:
    import importlib
    import importlib.util

    from dpo_ray.models import skip_unused_imports

    skip_unused_imports()
    for name in ("mlflow.transformers", "peft"):
        if importlib.util.find_spec(name.partition(".")[0]):
            importlib.import_module(name)
