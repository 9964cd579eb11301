"""The four batch stages in order (index → scrape → preprocess → train), each skipping what
earlier runs already did. Serving is not a stage that ends: ``jobs/everything.py`` starts it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from voxtral.config import Config
from voxtral.stages.index import run_index
from voxtral.stages.preprocess import run_preprocess
from voxtral.stages.scrape import run_scrape
from voxtral.stages.train.run import run_train

# stage name → function of the Config returning a summary dict
STAGES: dict[str, Callable[[Config], dict]] = {
    "index": run_index,
    "scrape": run_scrape,
    "preprocess": run_preprocess,
    "train": run_train,
}


def run_stages(
    cfg: Config,
    stages: Sequence[str] = tuple(STAGES),
    report: Callable[[str], None] = lambda line: None,
) -> dict[str, dict]:
    """Run the given stages in order; return each one's summary (with ``wall_s``). ``report``
    gets a line as each stage starts and ends (the job prints them)."""
    summaries: dict[str, dict] = {}
    for name in stages:
        report(f"== {name}: starting")
        t0 = time.perf_counter()
        summary = {**(STAGES[name](cfg) or {}), "wall_s": round(time.perf_counter() - t0, 2)}
        report(f"== {name}: done {json.dumps(summary, default=str)}")
        summaries[name] = summary
    return summaries
