"""The reward-KL frontier (the DPO paper's Figure 2, left): one policy per beta and loss type, trained on the
same pairs and the same reference log-probs (computed once), all evaluated on the same held-out prompts.

    python pipelines/frontier.py [--config configs/default.yaml] [frontier.betas=[0.05,0.1,0.5]] [frontier.losses=[sigmoid,ipo]]

Writes <run dir>/frontier/<loss>_beta<beta>/{train,evaluate}/ and frontier.{json,md,png}; all in MLflow.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_ray.cli import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("frontier")
