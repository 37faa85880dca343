"""`dpo-ray run` for the whole round, `dpo-ray <stage>` to run one stage alone on explicit paths.

    dpo-ray run [--config configs/default.yaml] [key.path=value ...]
    dpo-ray frontier [--config ...] [frontier.betas=[0.05,0.1,0.5]] [frontier.losses=[sigmoid,ipo]]
    dpo-ray plan [--config ...] [--gpu-memory GIB] [--workers N]   memory per training worker, per strategy
    dpo-ray sample    --out DIR                               [--config ...] [overrides]
    dpo-ray label     --completions DIR --out DIR  |  --out DIR with data.preferences=FILE
    dpo-ray reference --pairs DIR --out DIR        [--replay EARLIER_PAIRS_DIR ...]
    dpo-ray train     --reference DIR --out DIR
    dpo-ray evaluate  --prompts PROMPTS.parquet --policy DIR --out DIR

An error in the config, the input data, a model or the run folder prints one line and exits with 2 (config),
3 (input), 4 (model), 5 (storage) or 6 (training); add --debug (or set DPO_RAY_DEBUG=1) for the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from dpo_ray import artifacts
from dpo_ray.cluster import check_run_root, init_ray
from dpo_ray.config import LoraSettings, PipelineConfig, load_config
from dpo_ray.errors import find_user_error, one_line, tracking_store_error
from dpo_ray.pipeline import run_frontier, run_pipeline
from dpo_ray.runner import MANY, StageRunner
from dpo_ray.stages import evaluate, label, reference, sample, train
from dpo_ray.tracking import Tracker

log = logging.getLogger(__name__)

STAGES = {"sample": sample, "label": label, "reference": reference, "train": train, "evaluate": evaluate}


def _parser(stage: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dpo-ray {stage or 'run'}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.beta=0.2")
    if stage:
        parser.add_argument("--out", required=True, help="output folder (written atomically)")
        for name, kind in STAGES[stage].SOURCES.items():
            if kind == MANY:
                parser.add_argument(f"--{name}", action="append", help="may be given several times")
            else:
                parser.add_argument(f"--{name}", required=kind)
    return parser


def _load(args) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def stage_main(stage: str, argv: list[str] | None = None) -> None:
    """One stage on explicit paths, keyed and published exactly as `dpo-ray run` runs it (runner.StageRunner)."""
    args = _parser(stage).parse_intermixed_args(argv)
    cfg = _load(args)
    check_run_root(cfg)
    init_ray(cfg)
    out = Path(args.out).resolve()
    given = {name: getattr(args, name) for name in STAGES[stage].SOURCES if getattr(args, name)}
    sources = {name: [Path(p) for p in value] if isinstance(value, list) else Path(value)
               for name, value in given.items()}
    manifest = StageRunner(Tracker(cfg))(STAGES[stage], cfg, out, sources)
    log.info(f"{stage} output: {out} ({artifacts.MANIFEST}: {manifest['key'][:12]})")


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def plan_main(argv: list[str]) -> None:
    """Print the memory plan (memory_plan.py) of the config's training for every strategy, loading no weights."""
    import torch

    from dpo_ray import memory_plan
    from dpo_ray.models import resolve_model

    parser = _parser(None)
    parser.prog = "dpo-ray plan"
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="memory of one GPU, to say which settings fit (default: this machine's first GPU)")
    parser.add_argument("--workers", type=int, help="training workers (default: train.num_workers)")
    args = parser.parse_intermixed_args(argv)
    cfg = _load(args)
    workers = args.workers or cfg.train.num_workers
    device_memory = args.gpu_memory * memory_plan.GIB if args.gpu_memory else None
    if device_memory is None and torch.cuda.is_available():
        device_memory = torch.cuda.get_device_properties(0).total_memory
    shape = memory_plan.model_shape(resolve_model(cfg.model.policy), cfg.train.lora or LoraSettings(),
                                    cfg.model.trust_remote_code)
    t, d = cfg.train, cfg.data
    print(f"{cfg.model.policy}: {shape.params / 1e6:.1f}M parameters ({shape.lora_params / 1e6:.2f}M under LoRA "
          f"r={(t.lora or LoraSettings()).r}), {cfg.model.dtype}, {workers} worker(s), micro-batch of "
          f"{t.micro_batch_size} pairs at up to {d.max_prompt_tokens}+{d.max_completion_tokens} tokens; GiB per worker")
    print(memory_plan.render(memory_plan.plan(cfg, shape, workers), memory_plan.configured_setting(cfg),
                             device_memory))
    if device_memory is None:
        print("Give --gpu-memory GIB to see which settings fit.")
    print("Not counted: the CUDA context and kernel workspaces (about 0.5-1 GiB per GPU), allocator "
          "fragmentation; formulas and how they were checked: dpo_ray/memory_plan.py.")


def script_main(command: str, default_config: Path = DEFAULT_CONFIG) -> None:
    """Entry of the pipelines/ scripts: `command` with `default_config` unless --config is given."""
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", str(default_config), *args]
    main([command, *args])


def main(argv: list[str] | None = None) -> None:
    """Errors caused by config, input, models or storage end as one line and their exit code (errors.py);
    `--debug` or DPO_RAY_DEBUG=1 lets their traceback through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DPO_RAY_DEBUG") == "1"
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if not debug:
        # MLflow logs every failed write to its SQL store with the whole traceback, once per retry and layer;
        # the failure itself reaches the user as one line (errors.tracking_store_error), or with --debug in full.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    joined_ray_before = _joined_ray()
    try:
        with _sigterm_unwinds():
            _dispatch(command, rest)
    except Exception as err:
        problem = find_user_error(err) or tracking_store_error(err, f"dpo-ray {command}")
        if problem is None or debug:
            raise
        if not joined_ray_before:
            _leave_ray()
        print(one_line(problem), file=sys.stderr, flush=True)
        raise SystemExit(problem.exit_code) from None


def _joined_ray() -> bool:
    ray = sys.modules.get("ray")  # not imported for errors met before any stage starts
    return ray is not None and ray.is_initialized()


def _leave_ray() -> None:
    """Disconnect from the Ray cluster this command joined before its error is printed: until the driver
    disconnects, Ray forwards its workers' and raylets' log lines (a raylet warns every 10 s while its disk is over
    95% full), which would otherwise land after the error line the user reads last. A connection the caller made
    before calling main() is the caller's to end."""
    if _joined_ray():
        with contextlib.suppress(Exception):
            sys.modules["ray"].shutdown()


@contextlib.contextmanager
def _sigterm_unwinds():
    """`ray job stop`, `kill` and batch schedulers stop a driver with SIGTERM, whose default ends the process on
    the spot: its MLflow runs would stay RUNNING forever. As SystemExit it unwinds instead, and every open run
    ends FAILED (MLflow's start_run context does that for any exception)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        print("dpo-ray: stopped by SIGTERM; open MLflow runs end FAILED, unfinished stages publish nothing, and a "
              "rerun of the same command resumes", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(command: str, rest: list[str]) -> None:
    if command in ("run", "frontier"):
        (run_pipeline if command == "run" else run_frontier)(_load(_parser(None).parse_intermixed_args(rest)))
    elif command == "plan":
        plan_main(rest)
    elif command in STAGES:
        stage_main(command, rest)
    else:
        sys.exit(f"dpo-ray: unknown command {command!r}; expected run, frontier, plan or one of {', '.join(STAGES)}")


if __name__ == "__main__":
    main()
