"""``load_dataset`` that does not wait on an unreachable Hugging Face Hub.

Without network, ``datasets`` retries each request with back-off (about 25 s and a dozen WARNING lines per dataset)
before falling back to the cache. One TCP connect to the endpoint decides first; when it fails the call runs in
the libraries' offline mode, which reads the local cache directly or fails at once.
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
def _offline() -> Iterator[None]:
    """huggingface_hub's and datasets' offline switches on for the duration (they are read at call time)."""
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def load_hub_dataset(*args: Any, **kwargs: Any):
    """``datasets.load_dataset(*args, **kwargs)``, from the cache without network retries when the Hub is not
    reachable. Raises what ``load_dataset`` raises (OSError subclasses when neither the Hub nor a cache has it)."""
    from datasets import load_dataset

    if hub_reachable():
        return load_dataset(*args, **kwargs)
    with _offline():
        return load_dataset(*args, **kwargs)
