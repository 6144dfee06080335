"""python -m wct.serve: the OpenAI API over a packed tiny-llama base and two weak-column deltas, driven by the official
``openai`` client against a server this module starts on 127.0.0.1 (a free port). Every load is bounded: a few
requests, each with a timeout."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from wct.generation import generate, render  # noqa: E402
from wct.kernels.dispatch import resolve_backend  # noqa: E402
from wct.checkpoint import load_quantized  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {"base": "The weather", "alpha": "Once upon", "beta": "Numbers: 1"}


class Server:
    """``python -m wct.serve`` in a child process; ``url`` once it printed its address."""

    def __init__(self, tmp: Path, *overrides: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wct.serve", "port=0", f"hydra.run.dir={tmp / 'run'}", *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError("the server did not start in 120 s:\n" + "".join(self.output)) from None
            if line.startswith("serving on "):
                self.url = line.split()[2]
                break
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError("the server exited:\n" + "".join(self.output))
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_owq_base, weak_delta):
    tmp = tmp_path_factory.mktemp("serve")
    base = tiny_owq_base(tmp / "tiny-owq")
    deltas = tmp / "deltas"
    deltas.mkdir()
    weak_delta(base, deltas / "alpha.safetensors", 0.5, seed=1)
    weak_delta(base, deltas / "beta.safetensors", 0.5, seed=2)
    weak_delta(tiny_owq_base(tmp / "other-base", calib_seed=1), deltas / "foreign.safetensors", 0.5, seed=3)
    server = Server(tmp, f"model.quantized={base}", f"deltas={deltas}", "name=base", "max_wait_ms=300",
                    "max_prompt_tokens=64", "max_tokens=48", "default_max_tokens=16", "watch_s=0")
    yield server, base, deltas, tmp
    assert server.stop() == 0, "".join(server.output)


@pytest.mark.parametrize("override, message", [
    ("port=70000", "port=70000 is invalid"),
    ("max_batch=0", "max_batch=0 is invalid; it must be >= 1"),
    ("default_max_tokens=600", "default_max_tokens=600 is invalid; it must be <= max_tokens=512"),
    ("kernel=fast", "kernel='fast' is unknown"),
    ("max_wait_ms=-1", "max_wait_ms=-1.0 is invalid"),
])
def test_serve_config_bad_values_name_the_key(override, message):
    from hydra import compose, initialize_config_dir

    from wct.config import CONF_DIR, ServeApp, to_app
    from wct.errors import WCTError

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        assert to_app(compose("serve"), ServeApp).host == "127.0.0.1"  # loopback unless asked
        with pytest.raises(WCTError, match=message):
            to_app(compose("serve", overrides=[override]), ServeApp)


def test_cli_a_missing_deltas_folder_is_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "wct.serve", "model.name=tiny-llama", f"deltas={tmp_path / 'none'}",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: deltas={tmp_path / 'none'} is not a folder; pass the folder holding the *.safetensors deltas written "
        "by python -m wct.export format=delta"]


def reference(base: Path, delta: Path | None, prompt: str, n: int, chat: bool = False) -> str:
    """What python -m wct.generate answers: the delta applied to a freshly loaded base (wct.apply_delta), greedy."""
    model, tok = load_quantized(base, delta=delta)
    text = render(tok, prompt, template="chat" if chat else "none")
    return generate(model, tok, text, max_new_tokens=n, add_special_tokens=not chat)


def complete(server: Server, model: str, prompt: str, **kw):
    return server.client.completions.create(model=model, prompt=prompt, temperature=0, **kw)


def test_startup_lists_the_deltas_and_refuses_one_of_another_base(served):
    server, _, _, _ = served
    out = "".join(server.output)
    backend = resolve_backend("auto", torch.device("cpu"), 1)  # the CPU default (wct.kernels.dispatch)
    assert "deltas: 2 from" in out and f"backend {backend}" in out and "MiB resident" in out
    assert "refused foreign.safetensors" in out and "exported for another base" in out
    assert [m.id for m in server.client.models.list()] == ["base", "alpha", "beta"]


def test_greedy_outputs_equal_wct_generate_for_the_base_and_each_delta(served):
    server, base, deltas, _ = served
    texts = {}
    for name in ("base", "alpha", "beta"):
        delta = None if name == "base" else deltas / f"{name}.safetensors"
        got = complete(server, name, PROMPTS["alpha"], max_tokens=12)
        assert got.choices[0].text == reference(base, delta, PROMPTS["alpha"], 12)
        assert got.model == name and got.usage.completion_tokens <= 12
        texts[name] = got.choices[0].text
    assert len(set(texts.values())) == 3  # the deltas change the answers: each request really used its own
    chat = server.client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi there"}],
                                                 temperature=0, max_tokens=10)
    assert chat.choices[0].message.content == reference(base, deltas / "beta.safetensors", "Hi there", 10, chat=True)


def test_a_batch_mixing_two_deltas_and_the_base_gives_each_request_its_tokens_alone(served):
    server, _, _, _ = served
    alone = {name: complete(server, name, p, max_tokens=16).choices[0].text for name, p in PROMPTS.items()}
    before = server.health()
    with ThreadPoolExecutor(3) as pool:  # arrive within max_wait_ms=300: one batch of three rows, three deltas
        together = dict(zip(PROMPTS, pool.map(lambda kv: complete(server, kv[0], kv[1], max_tokens=16), PROMPTS.items())))
    after = server.health()
    assert {n: r.choices[0].text for n, r in together.items()} == alone
    assert after["mixed_batches"] > before["mixed_batches"] and after["largest_batch"] >= 3


def test_bank_logits_of_a_mixed_batch_match_each_delta_applied(served):
    """The per-row weak-column product against an independent reference: each delta applied to its own base copy."""
    from wct.serving.bank import DeltaBank

    _, base, deltas, _ = served
    model, _ = load_quantized(base)
    bank = DeltaBank(model, "base")
    for name in ("alpha", "beta"):
        bank.add(name, deltas / f"{name}.safetensors")
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), bank.use([1, 0, 2]):
        mixed = model(ids).logits
    for row, delta in enumerate([deltas / "alpha.safetensors", None, deltas / "beta.safetensors"]):
        ref, _ = load_quantized(base, delta=delta)
        with torch.no_grad():
            expected = ref(ids[row:row + 1]).logits[0]
        assert (mixed[row] - expected).abs().max().item() < 1e-4
    files = sum(os.path.getsize(deltas / f"{n}.safetensors") for n in ("alpha", "beta"))
    assert 0 < bank.delta_bytes <= files  # a delta costs its own columns, nothing more


def test_streaming_concatenates_to_the_non_streamed_text_and_stops_at_a_stop_string(served):
    server, _, _, _ = served
    full = complete(server, "alpha", PROMPTS["base"], max_tokens=24).choices[0].text
    chunks = list(complete(server, "alpha", PROMPTS["base"], max_tokens=24, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full and chunks[-1].choices[0].finish_reason == "length"
    full = complete(server, "beta", "Hello there", max_tokens=24).choices[0].text
    first = [i for i, ch in enumerate(full) if i > 2 and ch.isprintable() and ch != "\ufffd" and full.index(ch) == i]
    stop = full[first[0]]  # a character the answer first holds after a few others: the text ends just before it
    cut = complete(server, "beta", "Hello there", max_tokens=24, stop=["@@", stop])
    assert cut.choices[0].text == full[:first[0]] and cut.choices[0].finish_reason == "stop"
    streamed = list(complete(server, "beta", "Hello there", max_tokens=24, stop=["@@", stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"
    chat = dict(model="beta", messages=[{"role": "user", "content": "Tell me"}], temperature=0, max_tokens=12)
    whole = server.client.chat.completions.create(**chat).choices[0].message.content
    parts = server.client.chat.completions.create(**chat, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == whole


@pytest.mark.parametrize("body, status, names", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "gamma", "prompt": "hi"}, 404, "'gamma' is not served"),
    ({"model": "alpha", "prompt": "x" * 80}, 400, "max_prompt_tokens=64"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens=-3"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": 49}, 400, "limit max_tokens=48"),
    ({"model": "alpha", "prompt": "hi", "logit_bias": {"5": 1}}, 400, "'logit_bias' is not supported"),
    ({"model": "alpha", "prompt": "hi", "n": 2}, 400, "'n' is not supported"),
    ({"model": "alpha", "prompt": "hi", "temperature": 3}, 400, "temperature=3"),
])
def test_bad_input_gets_its_status_and_one_json_error_line_and_the_server_keeps_serving(served, body, status, names):
    server, _, _, _ = served
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/completions", content=data, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status and "\n" not in r.text.strip()
    assert names in r.json()["error"]["message"]
    assert complete(server, "beta", "ok", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def reference_ids(base: Path, delta: Path, prompt: str, **generate_kw) -> list[int]:
    """The new token ids transformers' ``generate`` gives greedy for ``prompt`` on ``base`` with ``delta`` applied."""
    model, tok = load_quantized(base, delta=delta)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, pad_token_id=tok.pad_token_id, **generate_kw)
    return out[0, ids.shape[1]:].tolist()


def test_ignore_eos_runs_a_row_past_eos_to_max_tokens(served):
    """vLLM's ``ignore_eos`` extension: the EOS token is kept and counted, the row runs to max_tokens, and its tokens
    are what ``generate`` gives without an EOS token."""
    server, base, deltas, _ = served
    plain = complete(server, "beta", "b", max_tokens=30)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 30  # EOS comes early here
    got = complete(server, "beta", "b", max_tokens=30, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 30 and got.choices[0].finish_reason == "length"
    _, tok = load_quantized(base)
    expected = reference_ids(base, deltas / "beta.safetensors", "b", max_new_tokens=30, eos_token_id=None)
    assert tok.eos_token_id in expected and len(expected) == 30
    assert got.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    streamed = complete(server, "beta", "b", max_tokens=30, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text


def test_min_tokens_masks_eos_until_the_row_has_them(served):
    """vLLM's ``min_tokens`` extension: EOS cannot end the row before min_tokens (transformers' min_new_tokens), stop
    strings count only from there on."""
    server, base, deltas, _ = served
    plain = complete(server, "beta", "b", max_tokens=30)
    n, text = plain.usage.completion_tokens, plain.choices[0].text
    assert plain.choices[0].finish_reason == "stop" and n < 20
    got = complete(server, "beta", "b", max_tokens=30, extra_body={"min_tokens": n + 5})
    assert got.usage.completion_tokens >= n + 5
    _, tok = load_quantized(base)
    expected = tok.decode(reference_ids(base, deltas / "beta.safetensors", "b", max_new_tokens=30,
                                        min_new_tokens=n + 5), skip_special_tokens=True)
    assert got.choices[0].text == expected
    stop = next(ch for ch in text if ch.isprintable() and ch != "\ufffd")  # early in the answer
    assert complete(server, "beta", "b", max_tokens=30, stop=[stop]).choices[0].text == text[:text.index(stop)]
    late = complete(server, "beta", "b", max_tokens=30, stop=[stop], extra_body={"min_tokens": n + 5})
    assert late.usage.completion_tokens >= n + 5 and expected.startswith(late.choices[0].text)


@pytest.mark.parametrize("max_tokens, extra, names", [
    (4, {"ignore_eos": "yes"}, "ignore_eos='yes' is invalid"),
    (4, {"min_tokens": -1}, "min_tokens=-1 is invalid"),
    (8, {"min_tokens": 9}, "from 0 to max_tokens=8"),
    (4, {"min_tokens": 1.5}, "min_tokens=1.5 is invalid"),
])
def test_bad_extension_values_get_a_400_naming_them(served, max_tokens, extra, names):
    server, _, _, _ = served
    with pytest.raises(openai.BadRequestError, match=names):
        complete(server, "alpha", "hi", max_tokens=max_tokens, extra_body=extra)


def test_the_openai_client_raises_the_documented_errors(served):
    server, _, _, _ = served
    with pytest.raises(openai.NotFoundError, match="not served"):
        complete(server, "nobody", "hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        complete(server, "alpha", "hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        complete(server, "alpha", "hi", presence_penalty=0.5)


def test_a_client_leaving_mid_stream_stops_its_row_and_the_server_keeps_serving(served):
    server, _, _, _ = served
    before = server.health()["cancelled"]
    body = {"model": "beta", "prompt": "Go on", "max_tokens": 48, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # the first event arrived: the row is running; then the client goes away
    deadline = time.monotonic() + 30
    while server.health()["cancelled"] <= before:
        assert time.monotonic() < deadline, "the server did not notice the client leaving"
        time.sleep(0.05)
    assert complete(server, "beta", "still", max_tokens=3).choices[0].finish_reason in ("length", "stop")


def test_reload_adds_a_new_delta_while_serving(served, weak_delta):
    server, base, deltas, tmp = served
    weak_delta(base, tmp / "gamma.safetensors", 0.5, seed=4)
    shutil.copy(tmp / "gamma.safetensors", deltas / "gamma.safetensors")
    r = httpx.post(f"{server.url}/v1/deltas/reload", timeout=30).json()
    assert r["added"] == ["gamma"] and "another base" in r["refused"]["foreign.safetensors"]
    assert "gamma" in [m.id for m in server.client.models.list()]
    got = complete(server, "gamma", PROMPTS["beta"], max_tokens=8).choices[0].text
    assert got == reference(base, deltas / "gamma.safetensors", PROMPTS["beta"], 8)


def test_over_capacity_is_429_and_sigterm_drains_the_requests_in_flight(served, tmp_path):
    _, base, _, _ = served
    server = Server(tmp_path, f"model.quantized={base}", "name=base", "max_batch=1", "max_queue=1", "max_tokens=400",
                    "max_wait_ms=0")
    try:
        body = {"model": "base", "prompt": "Long", "max_tokens": 400, "temperature": 0, "stream": True}
        events: list[dict] = []
        first = threading.Event()

        def long_stream() -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                        first.set()

        a = threading.Thread(target=long_stream)
        a.start()
        assert first.wait(30)  # A runs
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(complete, server, "base", "Queued", max_tokens=5)  # B waits in the queue
            deadline = time.monotonic() + 10
            while server.health()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            c = httpx.post(f"{server.url}/v1/completions", json={"model": "base", "prompt": "C", "max_tokens": 2},
                           timeout=10)
            assert c.status_code == 429 and int(c.headers["retry-after"]) >= 1
            assert "max_queue" in c.json()["error"]["message"]
            server.proc.send_signal(signal.SIGTERM)  # A still streaming, B queued
            assert b.result(timeout=60).choices[0].finish_reason in ("length", "stop")
        a.join(60)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 100  # A ran to its end after SIGTERM
        assert server.proc.wait(timeout=60) == 0
        assert "drained; stopped" in "".join(server.output)
    finally:
        server.stop()


def test_a_watched_folder_loads_new_deltas_once_complete_and_logs_a_refusal_once(served, weak_delta):
    """watch_s: a delta renamed into the folder (as wct.export writes) is served without a reload call; a file being
    written is refused once while incomplete and loaded once it changes into a whole delta; a removed file's delta
    stays served."""
    _, base, deltas, tmp = served
    folder = tmp / "watched"
    folder.mkdir()
    shutil.copy(deltas / "foreign.safetensors", folder)
    server = Server(tmp, f"model.quantized={base}", f"deltas={folder}", "name=base", "watch_s=0.2")
    try:
        def models() -> list[str]:
            return [m.id for m in server.client.models.list()]

        def wait_for(name: str) -> None:
            deadline = time.monotonic() + 30
            while name not in models():
                assert time.monotonic() < deadline, f"{name} was not loaded:\n" + "".join(server.output)
                time.sleep(0.1)

        assert models() == ["base"] and "watching" in "".join(server.output)
        weak_delta(base, folder / "gamma.safetensors", 0.5, seed=4)  # written to a temp name and renamed
        wait_for("gamma")
        got = complete(server, "gamma", PROMPTS["beta"], max_tokens=8).choices[0].text
        assert got == reference(base, folder / "gamma.safetensors", PROMPTS["beta"], 8)
        whole = (deltas / "alpha.safetensors").read_bytes()
        (folder / "late.safetensors").write_bytes(whole[: len(whole) // 2])  # a copy that stalls half way
        time.sleep(2.0)  # ten polls: refused once as truncated, not tried again while it does not change
        assert "late" not in models()
        with open(folder / "late.safetensors", "ab") as fh:
            fh.write(whole[len(whole) // 2:])
        wait_for("late")
        late = complete(server, "late", PROMPTS["alpha"], max_tokens=8)
        assert late.choices[0].text == reference(base, deltas / "alpha.safetensors", PROMPTS["alpha"], 8)
        (folder / "gamma.safetensors").unlink()
        time.sleep(1.0)
        assert "gamma" in models() and complete(server, "gamma", PROMPTS["beta"], max_tokens=8).choices[0].text == got
    finally:
        assert server.stop() == 0
    out = "".join(server.output)
    assert out.count("refused late.safetensors") == 1 and "truncated" in out
    assert out.count("refused foreign.safetensors") == 1  # at startup, not again at every poll
    assert out.count("gamma.safetensors was removed") == 1


def test_a_request_joins_a_batch_already_decoding_and_gets_its_tokens_alone(served):
    """Continuous batching: requests arriving while a long one decodes join its batch at the next step (they do not
    wait for it to end), and every row's greedy text is the one it gets alone."""
    _, base, deltas, tmp = served
    server = Server(tmp / "join", f"model.quantized={base}", f"deltas={deltas}", "name=base", "max_tokens=300",
                    "max_wait_ms=0", "watch_s=0")
    try:
        long = {"model": "alpha", "prompt": PROMPTS["alpha"], "temperature": 0, "max_tokens": 300,
                "extra_body": {"ignore_eos": True}}
        alone_long = server.client.completions.create(**long).choices[0].text
        alone = {n: complete(server, n, PROMPTS[n], max_tokens=6).choices[0].text for n in ("base", "beta")}
        before = server.health()
        chunks = iter(server.client.completions.create(stream=True, **long))
        pieces = [next(chunks).choices[0].text]  # the long request is decoding
        with ThreadPoolExecutor(2) as pool:
            short = {n: pool.submit(complete, server, n, PROMPTS[n], max_tokens=6) for n in alone}
            short = {n: f.result(timeout=60).choices[0].text for n, f in short.items()}
        during = server.health()
        pieces += [c.choices[0].text for c in chunks]
        assert short == alone and "".join(pieces) == alone_long
        assert during["joined"] >= before["joined"] + 2  # both joined the running batch
        assert during["tokens"] - before["tokens"] == 12  # the short ones finished, the long one had not
    finally:
        assert server.stop() == 0
