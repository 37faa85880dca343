"""One round of on-policy DPO: sample -> label -> reference -> train -> evaluate.

    python pipelines/full.py [--config configs/default.yaml] [train.beta=0.2 ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/full.py

With no --config it runs the embedded default: SmolLM2-135M-Instruct taught to write positive movie reviews.
"""

import sys
from pathlib import Path

# Importable from a plain checkout too (e.g. a Ray job's working dir), not only from an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_ray.cli import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("run")
