"""The five stages in order, each skipping what earlier runs already did."""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable, Sequence

from voxtral.config import Config

log = logging.getLogger("voxtral")

# stage name → "module:function" taking the Config and returning a summary dict
STAGES: dict[str, str] = {
    "index": "voxtral.index:run_index",
    "scrape": "voxtral.scrape:run_scrape",
    "preprocess": "voxtral.preprocess:run_preprocess",
    "train": "voxtral.train.run:run_train",
}
SERVE = "serve_app.app:start"


class StageNotBuilt(RuntimeError):
    pass


def stage_function(target: str) -> Callable:
    module, name = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise StageNotBuilt(f"{module} is not built yet") from None
        raise
    return getattr(mod, name)


def run_stages(cfg: Config, stages: Sequence[str] = tuple(STAGES)) -> dict[str, dict]:
    """Run the given stages in order and return each one's summary."""
    summaries: dict[str, dict] = {}
    for name in stages:
        try:
            fn = stage_function(STAGES[name])
        except StageNotBuilt as exc:
            print(f"== {name}: not built yet ({exc}); skipped", flush=True)
            summaries[name] = {"skipped": "not built"}
            continue
        print(f"== {name}: starting", flush=True)
        t0 = time.perf_counter()
        summary = fn(cfg) or {}
        summary = {**summary, "wall_s": round(time.perf_counter() - t0, 2)}
        print(f"== {name}: done {json.dumps(summary, default=str)}", flush=True)
        summaries[name] = summary
    return summaries


def serve(cfg: Config, blocking: bool = True):
    """Start the voice endpoint (stage 5) for this config."""
    try:
        start = stage_function(SERVE)
    except StageNotBuilt as exc:
        print(f"== serve: not built yet ({exc}); skipped", flush=True)
        return None
    return start(cfg, blocking=blocking)
