"""Voxtral: turn a pretrained Mistral-style text LLM into a speech LM, on Ray."""

import os

# Ray 2.60 re-packages the working directory for its workers when the driver runs under
# `uv run` (RAY_ENABLE_UV_RUN_RUNTIME_ENV). The project is already installed in the
# environment every worker uses, so that only slows start-up and moves the repo root out
# from under the stages. Ray reads the flag once, at import: it must be set before then.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
