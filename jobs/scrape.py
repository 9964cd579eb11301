"""Stage 2: download, cut and store the audio of every indexed video not yet done."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from voxtral.config import parse_cli  # noqa: E402
from voxtral.ray_utils import init_ray  # noqa: E402
from voxtral.stages.scrape import format_summary, run_scrape  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_cli(argv, description=__doc__)
    print(f"== ray: {init_ray()}", flush=True)
    summary = run_scrape(cfg)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
