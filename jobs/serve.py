"""Stage 5: the voice endpoint (Ray Serve) for the pipeline config, kept up until Ctrl-C.

uv run jobs/serve.py                                   # local profile: http://127.0.0.1:8000
uv run jobs/serve.py --set serve.model=runs/local/models/local
ray job submit --working-dir . -- python jobs/serve.py --config configs/youtube-mistral7b.yaml
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.app import deploy, serve_until_interrupted  # noqa: E402
from voxtral.config import parse_cli  # noqa: E402
from voxtral.ray_utils import init_ray  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--detach",
        action="store_true",
        help="deploy and return (on a running cluster; a local Ray ends with this process)",
    )
    cfg, args = parse_cli(argv, parser=parser)
    cfg.serve.check_exposure()  # before Ray starts: a tokenless public server never opens
    print(f"== ray: {init_ray()}", flush=True)
    served = deploy(cfg)
    print(f"voxtral serve: model {served['model']} ({served['model_source']})", flush=True)
    print(f"voxtral serve: open {served['url']} (websocket {served['websocket']})", flush=True)
    if not args.detach:
        serve_until_interrupted()
    return served


if __name__ == "__main__":
    main()
