"""The Ray Serve application: a ``Gateway`` (serve_app/gateway.py) in front of ``SpeechLM``
replicas (serve_app/speech_lm.py), bound from the pipeline config.

``build_app(cfg)`` binds both; ``app_builder`` does the same for ``serve run`` /
``serve deploy`` (``serve_app/config.yaml``); ``deploy(cfg)`` runs it on the connected Ray
(``jobs/serve.py`` and ``jobs/everything.py`` connect first, then call it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from serve_app.gateway import Gateway
from serve_app.model_source import resolve_model
from serve_app.speech_lm import SpeechLM
from voxtral.config import DEFAULT_CONFIG, Config, load_config

log = logging.getLogger("ray.serve.voxtral")
APP_NAME = "voxtral"


def build_app(cfg: Config, source: dict[str, Any] | None = None):
    """Both deployments bound to the pipeline config; ``source`` is the model folder that
    :func:`serve_app.model_source.resolve_model` picks (resolved here when not given)."""
    if source is None:
        source = resolve_model(cfg).describe()
    log.info("serving %s (%s)", source["model"], source["model_source"])
    s = cfg.serve
    cfg_dict = cfg.for_cluster()  # the token as its digest: Serve shows deployment arguments
    lm = SpeechLM.options(
        num_replicas=s.num_replicas,
        max_ongoing_requests=2 * s.max_sessions + 8,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        request_router_config=RequestRouterConfig(
            request_router_class="serve_app.routing:SessionAffinityRouter"
        ),
        health_check_period_s=10,
    ).bind(cfg_dict, source)
    return Gateway.options(
        num_replicas=s.gateway_replicas,
        max_ongoing_requests=s.max_sessions * s.num_replicas + 16,
        ray_actor_options={"num_cpus": s.gateway_num_cpus},
    ).bind(cfg_dict, lm, source)


def app_builder(args: dict[str, Any]):
    """``serve run serve_app.app:app_builder config=configs/local.yaml`` (and config.yaml)."""
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    return build_app(load_config(args.get("config", DEFAULT_CONFIG), overrides))


def url_of(cfg: Config) -> str:
    host = cfg.serve.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{cfg.serve.port}"


def deploy(cfg: Config) -> dict[str, str]:
    """Deploy the application on the Ray this process is connected to; return where it
    listens (``url``, ``websocket``) and what it serves (``model``, ``model_source``).

    The caller has checked ``cfg.serve.check_exposure()`` before starting Ray, so a
    tokenless public server never opens."""
    cfg.serve.check_exposure()
    source = resolve_model(cfg).describe()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, source), name=APP_NAME, route_prefix="/", blocking=False)
    url = url_of(cfg)
    return {"url": url, "websocket": url.replace("http", "ws", 1) + "/api/chat", **source}


def serve_until_interrupted() -> None:
    """Keep this process (and a local Ray with it) alive until Ctrl-C, then delete the app."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
