"""Ray dashboard metrics (``ray.util.metrics``), declared once per concept.

A metric object belongs to the process that made it, so each process creates its own on
first use, and only inside Ray (a driver without Ray records nothing). Recording is best
effort: the dashboard is a view and never fails the work it watches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("voxtral")


@dataclass(frozen=True)
class Metric:
    kind: Literal["counter", "gauge", "histogram"]
    name: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histograms only


class Metrics:
    """A named set of metrics: ``METRICS.record("videos", 1, status="done")``."""

    def __init__(self, **specs: Metric):
        self.specs = specs
        self._made: dict[str, Any] | None = None

    def _objects(self) -> dict[str, Any] | None:
        if self._made is None:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util.metrics import Counter, Gauge, Histogram

            made: dict[str, Any] = {}
            for key, m in self.specs.items():
                if m.kind == "histogram":
                    made[key] = Histogram(m.name, m.description, list(m.boundaries), m.tag_keys)
                else:
                    cls = Counter if m.kind == "counter" else Gauge
                    made[key] = cls(m.name, m.description, m.tag_keys)
            self._made = made
        return self._made

    def record(self, key: str, value: float = 1.0, **tags: str) -> None:
        """Add to a counter (positive values only), set a gauge or observe a histogram."""
        try:
            objects = self._objects()
            if objects is None:
                return
            kind = self.specs[key].kind
            if kind == "counter":
                if value > 0:
                    objects[key].inc(value, tags=tags or None)
            elif kind == "gauge":
                objects[key].set(value, tags=tags or None)
            else:
                objects[key].observe(value, tags=tags or None)
        except Exception:  # noqa: BLE001 - best effort, see the module docstring
            log.debug("metric %s not recorded", key, exc_info=True)
