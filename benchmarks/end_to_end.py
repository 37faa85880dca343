"""Figure 5: per-stage wall time of a finished round, read from its stage manifests (nothing is run here).

Each stage folder of a run (runs/<name>/<stage>/manifest.json) records `seconds` (the stage's wall time, from
its start to the manifest) and its stats; this prints them in pipeline order with each stage's share, plus the
throughput figures the stats allow (train tokens/s as the train stage logged it, pairs scored per second).

    .venv-bench/bin/python benchmarks/end_to_end.py runs/default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

STAGES = ("sample", "label", "reference", "train", "evaluate")


def read_run(run_dir: Path) -> dict:
    stages = {}
    for name in STAGES:
        manifest = run_dir / name / "manifest.json"
        if manifest.is_file():
            stages[name] = json.loads(manifest.read_text())
    return stages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", default=str(common.ROOT / "runs" / "default"))
    p.add_argument("--no-write", action="store_true", help="print only, write no result file")
    args = p.parse_args()

    run_dir = Path(args.run_dir).resolve()
    stages = read_run(run_dir)
    if not stages:
        raise SystemExit(f"{run_dir}: no stage manifests (run the pipeline first, e.g. `make run`)")
    total = sum(m["seconds"] for m in stages.values())
    rows = []
    print(f"{'stage':<10} {'seconds':>8} {'share':>6}  finished_at          notes")
    for name, m in stages.items():
        s = m.get("stats", {})
        notes = []
        if name == "sample" and s.get("completion_tokens"):
            notes.append(f"{s['completions']} completions, {s['completion_tokens']} tokens "
                         f"({s['completion_tokens'] / m['seconds']:.0f} generated tok/s incl. startup)")
        if name == "reference" and s.get("pairs"):
            notes.append(f"{s['pairs']} pairs ({s['pairs'] / m['seconds']:.2f} pairs/s incl. startup)")
        if name == "train" and s.get("tokens"):
            notes.append(f"{s.get('steps')} steps, {s['tokens']} tokens, last step {s['final/tokens_per_s']:.0f} tok/s")
        rows.append({"stage": name, "seconds": m["seconds"], "share": m["seconds"] / total,
                     "finished_at": m.get("finished_at"), "stats": s})
        print(f"{name:<10} {m['seconds']:>8.1f} {100 * m['seconds'] / total:>5.1f}%  {m.get('finished_at', ''):<20} "
              f"{'; '.join(notes)}")
    print(f"{'total':<10} {total:>8.1f}")
    missing = [s for s in STAGES if s not in stages]
    if missing:
        print(f"(no manifest for: {', '.join(missing)})")
    if not args.no_write:
        out = common.write_result("end_to_end", {"run_dir": str(run_dir), "stages": rows, "total_s": total,
                                                 "missing": missing,
                                                 "note": "seconds are the run's own; this file only read them"})
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
