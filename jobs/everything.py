"""Every stage in order: index → scrape → preprocess → train → serve.

uv run jobs/everything.py                    # the local profile, ends serving on :8000
uv run jobs/everything.py --no-serve         # stop after training
python jobs/everything.py --config configs/youtube-mistral7b.yaml   # on a cluster
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.app import deploy, serve_until_interrupted  # noqa: E402
from voxtral.config import parse_cli  # noqa: E402
from voxtral.pipeline import run_stages  # noqa: E402
from voxtral.ray_utils import init_ray  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-serve", action="store_true", help="stop after training")
    cfg, args = parse_cli(argv, parser=parser)
    if not args.no_serve:
        cfg.serve.check_exposure()  # fail now, not after hours of training
    print(f"== ray: {init_ray()}", flush=True)
    summaries = run_stages(cfg, report=lambda line: print(line, flush=True))
    if not args.no_serve:
        served = deploy(cfg)
        print(f"voxtral serve: model {served['model']} ({served['model_source']})", flush=True)
        print(f"voxtral serve: open {served['url']} (websocket {served['websocket']})", flush=True)
        serve_until_interrupted()
    return summaries


if __name__ == "__main__":
    main()
