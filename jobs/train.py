"""Stage 4: fine-tune the speech LM on ``tokens/`` with Ray Train + DeepSpeed ZeRO, then
export it to ``models/<run_name>``. Rerunning the same ``train.run_name`` resumes.

    uv run jobs/train.py [--config configs/local.yaml] [--set train.num_workers=2]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

# `ray job submit -- python jobs/…` runs this file from the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from voxtral.config import parse_cli  # noqa: E402
from voxtral.ray_utils import init_ray  # noqa: E402
from voxtral.stages.train.run import format_summary, run_train  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, _ = parse_cli(argv, description="Train the speech LM with Ray Train and DeepSpeed.")
    print(f"== ray: {init_ray()}", flush=True)
    summary = run_train(cfg)
    print(format_summary(summary), flush=True)
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    return summary


if __name__ == "__main__":
    main()
