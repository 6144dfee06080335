"""``python -m wct.serve``: an OpenAI-compatible server for a packed base and its weak-column deltas
(docs/serving.md). :mod:`bank` (per-row deltas in one batch), :mod:`engine` (dynamic batching), :mod:`api` (the
HTTP routes on FastAPI), :mod:`service` (loading, uvicorn, draining)."""
