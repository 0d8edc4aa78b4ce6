"""`lmtrain serve` as a real server (a subprocess on 127.0.0.1) spoken to by the official openai client and by
plain HTTP: routes, greedy output equal to `lmtrain generate` and to transformers, keys, limits, metrics, load,
and SIGTERM draining. `lmtrain bench-serve` against it."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtrain import generate as generate_lib
from lmtrain.interop import hf_import
from lmtrain.serve import bench
from tests.core_fixtures import REPO, cli_env
from tests.interop.test_hf_import import random_hf_model

KEY = "sk-test-0123456789abcdef"
START_SECONDS = 600  # loading and compiling on a busy 2-core machine
SERVE_FLAGS = ["--max-batch", "4", "--max-queue", "8", "--chunk", "16", "--max-tokens-cap", "48"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmtrain serve` in a subprocess; its stdout and stderr go to a log file read by the tests."""

    def __init__(self, path, tmp_path, *flags, env=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "lmtrain.cli", "serve", str(path), "--port", str(self.port),
                                      *SERVE_FLAGS, *flags], cwd=REPO, env={**cli_env(), **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lmtrain serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"lmtrain serve did not become healthy:\n{self.log()}")

    def request(self, method, path, body=None, key=KEY, raw: bytes | None = None, headers=None):
        """(status, headers, parsed JSON or text) of one request over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            head = {"Content-Type": "application/json", **(headers or {})}
            if key:
                head["Authorization"] = f"Bearer {key}"
            data = raw if raw is not None else (json.dumps(body) if body is not None else None)
            conn.request(method, path, body=data, headers=head)
            response = conn.getresponse()
            text = response.read().decode()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return response.status, dict(response.getheaders()), parsed
        finally:
            conn.close()

    def metric(self, name: str, key=KEY) -> float:
        _, _, text = self.request("GET", "/metrics", key=key)
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))

    def rss_kb(self) -> int:
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(hf_dir, workdir): a tiny random Llama with its tokenizer, and the WORKDIR `lmtrain import` makes of it."""
    root = tmp_path_factory.mktemp("serve")
    hf_dir, workdir = root / "hf", root / "work"
    random_hf_model("llama", hf_dir, seed=5, tokenizer=True)
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    return hf_dir, workdir


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# the test's keys\n{KEY}\nsk-another-key\n")
    s = Server(model_dirs[1], tmp_path_factory.mktemp("log"), "--api-keys", str(keys))
    yield s
    assert s.stop() == 0, s.log()
    assert KEY not in s.log()  # keys never reach the log
    assert "Traceback" not in s.log() and " 500" not in s.log(), s.log()


def _client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------ the openai client


def test_openai_client_completions_chat_and_streaming_with_a_key(server, model_dirs):
    client = _client(server)
    (model,) = [m.id for m in client.models.list()]
    assert model == model_dirs[1].name
    done = client.completions.create(model=model, prompt="the cat sat", max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.prompt_tokens > 0
    streamed = client.completions.create(model=model, prompt="the cat sat", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == done.choices[0].text

    # the tokenizer has no chat template: chat is a clear 400, and with a template it answers (below)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])

    with pytest.raises(openai.AuthenticationError):
        _client(server, key="sk-wrong").completions.create(model=model, prompt="a", max_tokens=2)

    several = client.completions.create(model=model, prompt="a dog", max_tokens=5, temperature=1.0, n=3, seed=11,
                                        logprobs=2)
    assert [c.index for c in several.choices] == [0, 1, 2]
    again = client.completions.create(model=model, prompt="a dog", max_tokens=5, temperature=1.0, n=3, seed=11,
                                      logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in several.choices]  # the seed reproduces
    for choice in several.choices:
        assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) <= 5
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    echoed = client.completions.create(model=model, prompt="the cat sat", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "the cat sat" + done.choices[0].text


def test_greedy_completion_equals_lmtrain_generate_and_transformers(server, model_dirs, capsys):
    hf_dir, workdir = model_dirs
    prompts = ["the cat sat on the mat", "once upon a time"]
    for prompt in prompts:
        status, _, body = server.request("POST", "/v1/completions", {
            "model": workdir.name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logprobs": 0})
        assert status == 200, body
        served = body["choices"][0]["text"]
        assert len(body["choices"][0]["logprobs"]["tokens"]) == 12

        assert generate_lib.main([str(workdir), "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eos"]) == 0
        printed = capsys.readouterr().out.split("\n", 1)[1].rsplit("\nlmtrain generate:", 1)[0]
        assert printed == prompt + served

        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert tok.decode(out[0, ids.shape[1]:].tolist()) == served


# ------------------------------------------------------------------------------------ keys


INFERENCE_ROUTES = [("GET", "/v1/models", None), ("GET", "/metrics", None),
                    ("POST", "/v1/completions", {"model": "work", "prompt": "a", "max_tokens": 2}),
                    ("POST", "/v1/chat/completions", {"model": "work", "messages": [{"role": "user", "content": "a"}]}),
                    ("POST", "/v1/classify", {"model": "work", "input": "a"})]


def test_every_route_but_health_needs_a_valid_key(server):
    for method, path, body in INFERENCE_ROUTES:
        for key, headers in ((None, None), ("sk-wrong", None), (KEY[:-1], None), (KEY + "x", None),
                             (None, {"Authorization": f"Basic {KEY}"}), (None, {"Authorization": KEY})):
            status, head, answer = server.request(method, path, body, key=key, headers=headers)
            assert status == 401, (path, key, headers, answer)
            assert head.get("www-authenticate") == "Bearer" and answer["error"]["type"] == "authentication_error"
    assert server.request("GET", "/health", key=None)[0] == 200
    assert server.request("GET", "/v1/models", key="sk-another-key")[0] == 200  # any key of the file


def test_without_keys_the_server_refuses_other_hosts_unless_told(model_dirs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", "serve", str(model_dirs[1]), "--host", "0.0.0.0"],
                          cwd=REPO, env={**cli_env(), "LMTRAIN_API_KEYS": ""}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("lmtrain serve: error: --host 0.0.0.0 without API keys")
    assert "--insecure-no-auth" in proc.stderr and "Traceback" not in proc.stderr
    keys = tmp_path / "empty.txt"
    keys.write_text("# nothing\n")
    proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", "serve", str(model_dirs[1]), "--api-keys", str(keys)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"--api-keys {keys}: the file holds no key" in proc.stderr


# ------------------------------------------------------------------------------------ limits


def test_bad_input_gets_400_or_422_never_a_500(server, model_dirs):
    name = model_dirs[1].name
    context = server.request("GET", "/v1/models")[2]["data"][0]["max_model_len"]
    cases = [
        (b"{not json", 422, "body"),
        (json.dumps({"model": name}).encode(), 422, "prompt"),
        (json.dumps({"model": name, "prompt": "a", "temperature": -1}).encode(), 422, "temperature"),
        (json.dumps({"model": name, "prompt": "a", "top_p": 0}).encode(), 422, "top_p"),
        (json.dumps({"model": name, "prompt": "a", "logprobs": 9}).encode(), 422, "logprobs"),
        (json.dumps({"model": name, "prompt": "a", "max_tokens": 0}).encode(), 422, "max_tokens"),
        (json.dumps({"model": name, "prompt": "a", "max_tokens": 49}).encode(), 400, "cap of 48"),
        (json.dumps({"model": name, "prompt": "a", "n": 5}).encode(), 400, "at most 4"),
        (json.dumps({"model": name, "prompt": [1, 2, 10 ** 6]}).encode(), 400, "vocabulary"),
        (json.dumps({"model": name, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "at most 4"),
        (json.dumps({"model": "other", "prompt": "a"}).encode(), 404, "not served"),
        (json.dumps({"model": name, "prompt": [5] * (context - 4), "max_tokens": 10}).encode(), 400,
         f"the prompt ({context - 4} tokens) plus max_tokens=10 is {context + 6} tokens, over the model's context "
         f"of {context}"),
        (json.dumps({"model": name, "prompt": [5] * context}).encode(), 400, f"the prompt has {context} tokens"),
    ]
    for raw, want, words in cases:
        status, _, body = server.request("POST", "/v1/completions", raw=raw)
        assert status == want, (raw, body)
        assert words in body["error"]["message"], (raw, body)
    status, _, body = server.request("POST", "/v1/classify", {"model": name, "input": "a"})
    assert status == 400 and "language model" in body["error"]["message"]
    assert "Traceback" not in server.log()


def test_a_full_queue_gets_429_with_retry_after_and_the_rest_are_answered(server, model_dirs):
    results = []

    def ask():
        results.append(server.request("POST", "/v1/completions", {
            "model": model_dirs[1].name, "prompt": "the cat", "max_tokens": 48, "ignore_eos": True}))

    threads = [threading.Thread(target=ask) for _ in range(24)]  # 4 decode, 8 wait, the rest are turned away
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r[0] for r in results)
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= 8  # at least a full queue of them
    for status, headers, body in results:
        if status == 429:
            assert headers["retry-after"] == "1" and "busy" in body["error"]["message"]
        else:
            assert body["usage"]["completion_tokens"] == 48


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, model_dirs):
    before = server.metric("lmtrain_generated_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": model_dirs[1].name, "prompt": "a", "max_tokens": 48,
                                                        "ignore_eos": True, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while server.metric("lmtrain_running_rows") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert server.metric("lmtrain_running_rows") == 0
    assert server.metric("lmtrain_generated_tokens_total") - before < 48  # decoding stopped before the end


def test_metrics_are_prometheus_text_with_counts_latencies_and_compiles(server):
    _, headers, text = server.request("GET", "/metrics")
    assert headers["content-type"].startswith("text/plain")
    for name in ("lmtrain_requests_total", "lmtrain_time_to_first_token_seconds_bucket",
                 "lmtrain_time_per_output_token_seconds_bucket", "lmtrain_request_latency_seconds_bucket",
                 "lmtrain_queue_depth", "lmtrain_generated_tokens_total", "lmtrain_compilations_total"):
        assert re.search(rf"^{name}", text, re.MULTILINE), name
    assert server.request("GET", "/v1/models", key="sk-wrong")[0] == 401
    assert server.metric('lmtrain_requests_total{route="/v1/models",status="401"}') >= 1
    assert server.metric("lmtrain_compilations_total") >= 1


# ------------------------------------------------------------------------------------ chat, no keys


@pytest.mark.heavy  # a second server: ~30 s to start on 2 busy cores
def test_a_server_without_keys_binds_loopback_and_chats_through_the_template(tmp_path):
    from tests.test_generate import _chat_hf_model

    _chat_hf_model(tmp_path / "chat")
    s = Server(tmp_path / "chat", tmp_path, env={"LMTRAIN_API_KEYS": ""})
    try:
        assert "no API keys" in s.log() and "127.0.0.1 only" in s.log()
        client = _client(s, key="unused")
        reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "w7 w9"}],
                                               max_tokens=6, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        streamed = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "w7 w9"}],
                                                  max_tokens=6, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == reply.choices[0].message.content
        assert s.request("GET", "/v1/models", key=None)[0] == 200
    finally:
        assert s.stop() == 0


# ------------------------------------------------------------------------------------ load, SIGTERM, bench


def _load(server, name, clients: int, requests: int) -> list:
    """`requests` completions from `clients` threads, of varied prompts and sampling values."""
    results: list = [None] * requests
    order = iter(range(requests))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            body = {"model": name, "prompt": bench.prompt_text(i, 1 + i % 20), "max_tokens": 1 + i % 8,
                    "temperature": (i % 3) * 0.5, "top_p": 1.0 - (i % 4) * 0.1, "seed": i, "stream": i % 2 == 0}
            results[i] = server.request("POST", "/v1/completions", body)[0]

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_load_all_answered_memory_flat_and_nothing_compiles_after_warm_up(server, model_dirs):
    name = model_dirs[1].name
    assert _load(server, name, 8, 40) == [200] * 40  # warm-up: first requests through every path
    compiles, rss = server.metric("lmtrain_compilations_total"), server.rss_kb()
    assert _load(server, name, 8, 200) == [200] * 200  # all answered, none lost
    assert server.metric("lmtrain_compilations_total") == compiles
    grown_mb = (server.rss_kb() - rss) / 1024
    assert grown_mb < 32, f"the server's RSS grew by {grown_mb:.1f} MB over 200 requests"  # allocator noise only


@pytest.mark.heavy
def test_sigterm_mid_load_finishes_in_flight_refuses_new_and_exits_0(model_dirs, tmp_path):
    s = Server(model_dirs[1], tmp_path, env={"LMTRAIN_API_KEYS": KEY})
    finished = []

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"model": model_dirs[1].name, "prompt": "a", "stream": True,
                                                            "max_tokens": 48, "ignore_eos": True}),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        lines = [line for line in conn.getresponse().read().decode().splitlines() if line.startswith("data: {")]
        finished.append([json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines][-1])

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while s.metric("lmtrain_running_rows", key=KEY) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.proc.send_signal(signal.SIGTERM)
    refused = False
    for _ in range(200):
        try:
            s.request("GET", "/v1/models")
        except (ConnectionRefusedError, ConnectionResetError):
            # Refused outright, or reset unanswered: a connect that raced into the listen backlog just as the
            # listener closed. Either way the new request was not served; a response of any kind fails below.
            refused = True
            break
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert s.proc.wait(timeout=60) == 0, s.log()
    assert refused, "new connections were still accepted while draining"
    assert finished == ["length"] * 4  # every in-flight request ran to its last token
    assert "Traceback" not in s.log()
    s.stop()


def test_bench_serve_reports_percentiles_and_writes_json_and_png(server, tmp_path, capsys):
    code = bench.main([server.url, "--concurrency", "4", "--requests", "8", "--prompt-len", "8", "--max-tokens", "6",
                       "--api-key", KEY, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "bench_serve.json").read_text())
    assert summary["ok"] == 8 and summary["output_tokens"] == 48
    assert 0 < summary["ttft_seconds"]["p50"] <= summary["ttft_seconds"]["p99"] <= summary["e2e_seconds"]["p99"]
    assert (tmp_path / "bench_serve.png").stat().st_size > 1000
    assert "output tokens/s" in out and "p95" in out


@pytest.mark.heavy  # a classifier server: ~30 s to start on 2 busy cores
def test_a_classifier_answers_classify_with_labels_and_transformers_probabilities(tmp_path):
    from tests.interop.test_hf_classifier import LABELS, random_hf_classifier
    from tests.interop.test_hf_import import tiny_tokenizer

    hf_dir = tmp_path / "clf"
    model = random_hf_classifier("qwen2", hf_dir)
    tok = tiny_tokenizer()
    tok.save_pretrained(str(hf_dir))
    s = Server(hf_dir, tmp_path, env={"LMTRAIN_API_KEYS": KEY})
    try:
        texts = ["the cat sat on the mat", "a dog"]
        status, _, body = s.request("POST", "/v1/classify", {"model": "clf", "input": texts})
        assert status == 200, body
        for text, row in zip(texts, body["data"], strict=True):
            with torch.no_grad():
                want = torch.softmax(model(input_ids=torch.tensor([tok.encode(text)])).logits.float(), -1)[0]
            assert list(row["probs"]) == LABELS
            assert [row["probs"][label] for label in LABELS] == pytest.approx(want.tolist(), abs=2e-3)
            assert row["label"] == LABELS[int(want.argmax())]
        status, _, body = s.request("POST", "/v1/completions", {"model": "clf", "prompt": "a"})
        assert status == 400 and "classifier" in body["error"]["message"]
        assert s.request("POST", "/v1/classify", {"model": "clf", "input": "a"}, key=None)[0] == 401
    finally:
        assert s.stop() == 0
