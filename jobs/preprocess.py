"""Stage 3: chunks → codec codes and timed text ids (``tokens/``), on a Ray actor pool.

uv run jobs/preprocess.py [--config configs/local.yaml] [--set preprocess.num_gpus=1]
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
from voxtral.stages.preprocess import format_summary, run_preprocess  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, _ = parse_cli(argv, description="Encode scraped chunks into codec tokens.")
    print(f"== ray: {init_ray()}", flush=True)
    summary = run_preprocess(cfg)
    print(format_summary(summary), flush=True)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


if __name__ == "__main__":
    main()
