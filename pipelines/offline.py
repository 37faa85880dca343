"""Offline DPO on an existing preference dataset: reference -> train -> evaluate (no sampling, no labeling).

    python pipelines/offline.py [--config configs/offline.yaml] [data.preferences=/data/prefs.jsonl ...]

The same driver as pipelines/full.py with data.preferences set; configs/offline.yaml ships a small Anthropic-HH
style sample so it runs as is.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_ray.cli import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("run", Path(__file__).resolve().parent.parent / "configs" / "offline.yaml")
