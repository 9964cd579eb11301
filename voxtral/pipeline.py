"""The four batch stages in order (index → scrape → preprocess → train), each skipping what
earlier runs already did. Serving is not a stage that ends: ``jobs/everything.py`` starts it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from voxtral.config import Config
from voxtral.stages import index, preprocess, scrape
from voxtral.stages.train import run as train


class Stage(NamedTuple):
    run: Callable[[Config], dict]  # does the work on the connected Ray; returns a summary
    table: Callable[[dict], str]  # the summary as the stage's own job prints it


STAGES: dict[str, Stage] = {
    "index": Stage(index.run_index, index.format_summary),
    "scrape": Stage(scrape.run_scrape, scrape.format_summary),
    "preprocess": Stage(preprocess.run_preprocess, preprocess.format_summary),
    "train": Stage(train.run_train, train.format_summary),
}


def run_stages(
    cfg: Config,
    stages: Sequence[str] = tuple(STAGES),
    report: Callable[[str], None] = lambda text: None,
) -> dict[str, dict]:
    """Run the given stages in order; return each one's summary (with ``wall_s``). ``report``
    gets text as each stage starts and ends: its table, then its summary as one JSON line
    (the job prints them)."""
    if "train" in stages:  # a config train would refuse fails now, not after the others
        train.validate(cfg)
    summaries: dict[str, dict] = {}
    for name in stages:
        stage = STAGES[name]
        report(f"== {name}: starting")
        t0 = time.perf_counter()
        summary = stage.run(cfg)
        report(stage.table(summary))
        summary = {**summary, "wall_s": round(time.perf_counter() - t0, 2)}
        report(f"== {name}: done {json.dumps(summary, default=str)}")
        summaries[name] = summary
    return summaries
