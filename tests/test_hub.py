"""wct.data.hub: an unreachable Hub is detected by one connect; datasets and models then use the cache without
retries."""

from __future__ import annotations

import socket
import time

import datasets.config
import pytest
from huggingface_hub import constants

from wct.data.hub import hub_reachable
from wct.data.instruct import load_hub
from wct.errors import WCTError
from wct.models import load_model


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def test_unreachable_hub_fails_fast_and_restores_the_switches(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert not hub_reachable()
    start = time.perf_counter()
    assert load_hub("wct-test/not-cached-anywhere", "train") is None  # no cache, no network: None, no retries
    assert time.perf_counter() - start < 10
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False


def test_listening_endpoint_counts_as_reachable(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert hub_reachable()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert not hub_reachable()  # offline mode wins without a connection attempt


def test_hub_model_offline_fails_fast_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(WCTError, match="could not load 'wct-test/not-cached-anywhere' from the Hugging Face hub"):
        load_model("wct-test/not-cached-anywhere")
    assert time.perf_counter() - start < 10 and constants.HF_HUB_OFFLINE is False
