"""Hub access that does not wait on an unreachable Hugging Face Hub (datasets and models).

Without network, ``datasets`` and ``transformers`` retry each request with back-off (about 25 s and a dozen WARNING
lines per dataset) before falling back to the cache. One TCP connect to the endpoint decides first; when it fails
the call runs in the libraries' offline mode, which reads the local cache directly or fails at once.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) accepts a TCP connection; False in offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def hub_or_cache() -> Iterator[None]:
    """Inside, hub calls go to the Hub when it is reachable, else straight to the local cache: huggingface_hub's
    and datasets' offline switches (read at call time, also by transformers) are on for the duration."""
    import datasets.config
    from huggingface_hub import constants

    if hub_reachable():
        yield
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def load_hub_dataset(*args: Any, **kwargs: Any):
    """``datasets.load_dataset(*args, **kwargs)`` under :func:`hub_or_cache`. Raises what ``load_dataset`` raises
    (OSError subclasses when neither the Hub nor the cache has it)."""
    from datasets import load_dataset

    with hub_or_cache():
        return load_dataset(*args, **kwargs)
