"""The OpenAI-compatible server over the engine: completions and chat completions (whole and streamed)
equal jaxfire.generate's, concurrent clients share the engine, bad requests get HTTP 400."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

import jaxfire
from jaxfire.chat import ChatTemplate
from jaxfire.server import CompletionServer, Limits
from tests.hf_models import CHAT_TEMPLATE

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def model():
    return jaxfire.load(dtype="float32")


@pytest.fixture(scope="module")
def served(model):
    """The built-in model (no chat template of its own) served twice over one engine: as it is, and
    with a chat template given as `--chat-template` gives it."""
    engine = jaxfire.Engine(model, slots=4, max_len=64).start()
    template = ChatTemplate(CHAT_TEMPLATE).with_special_tokens(model.tokenizer.special_tokens(1, 2))
    servers = [CompletionServer(engine, port=0), CompletionServer(engine, port=0, chat_template=template)]
    for server in servers:
        server.serve_in_thread()
    yield f"http://127.0.0.1:{servers[0].server_address[1]}", engine, f"http://127.0.0.1:{servers[1].server_address[1]}"
    for server in servers:
        server.shutdown()
        server.server_close()
    engine.close()


@pytest.fixture
def url(served):
    return served[0]


@pytest.fixture
def chat_url(served):
    return served[2]


def post(url, body, raw=False, route="/v1/completions"):
    req = urllib.request.Request(url + route, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read().decode() if raw else json.loads(resp.read())


def refusal(send, *args):
    """The HTTP status and OpenAI error message of a request the server refuses."""
    with pytest.raises(urllib.error.HTTPError) as err:
        send(*args)
    return err.value.code, json.loads(err.value.read())["error"]["message"]


def sse_chunks(text):
    lines = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion_equals_generate(url, model):
    want = jaxfire.generate(model, [PROMPT], max_new_tokens=12)
    out = post(url, {"prompt": PROMPT, "max_tokens": None, "temperature": 0, "logprobs": False, "ignore_eos": True})
    assert out["choices"][0]["logprobs"] is None
    assert out["usage"]["completion_tokens"] == 16  # null max_tokens: 16, as OpenAI's legacy default
    out = post(url, {"model": "jaxfire", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == want.texts[0]
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 12
    assert out["usage"]["prompt_tokens"] == len(model.tokenizer.encode(PROMPT))
    # token ids as the prompt, a stop string and vLLM's top_k -1 (no limit)
    ids = model.tokenizer.encode(PROMPT)
    stop = want.texts[0][4:7]
    out = post(url, {"prompt": ids, "max_tokens": 12, "temperature": 0, "stop": [stop], "top_k": -1})
    assert out["choices"][0]["text"] == want.texts[0][:want.texts[0].find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_streamed_chunks_arrive_per_token_and_concurrent_clients_share_the_engine(url, model):
    want = jaxfire.generate(model, [PROMPT], max_new_tokens=10, temperature=0.8, seed=5)
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0.8, "seed": 5, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    results = [None] * 3

    def client(i):
        results[i] = sse_chunks(post(url, body, raw=True))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for chunks in results:
        tokens, usage = chunks[:-1], chunks[-1]
        assert len(tokens) == 10  # one chunk a token
        assert "".join(c["choices"][0]["text"] for c in tokens) == want.texts[0]
        assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 9 + ["length"]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 4}, "'prompt' is required"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens must be an integer of at least 1"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "best_of": 2}, "unsupported field 'best_of'"),
    ({"prompt": PROMPT, "n": 17}, "'n' must be an integer in [1, 16]"),
    ({"prompt": PROMPT, "logprobs": 21}, "'logprobs' must be an integer in [0, 20]"),
    ({"prompt": PROMPT, "logprobs": True}, "'logprobs' must be an integer in [0, 20]"),
    ({"prompt": 5}, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists"),
    ({"prompt": [1, 10**6]}, "outside the vocabulary"),
])
def test_bad_requests_get_400_naming_the_problem(url, body, message):
    code, said = refusal(post, url, body)
    assert code == 400 and message in said


def test_models_health_and_unknown_routes(url):
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        assert json.loads(resp.read())["data"][0]["id"] == "jaxfire"
    with urllib.request.urlopen(url + "/health", timeout=30) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/v2/chat", timeout=30)
    assert err.value.code == 404


def test_metrics_count_the_served_requests(url):
    def scrape():
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if not line.startswith("#")}

    done = 'jaxfire:request_success_total{model_name="jaxfire",finished_reason="length"}'
    tokens = 'jaxfire:generation_tokens_total{model_name="jaxfire"}'
    before = scrape()
    post(url, {"prompt": PROMPT, "max_tokens": 7, "temperature": 0, "ignore_eos": True})
    after = scrape()
    assert after[done] == before.get(done, 0) + 1 and after[tokens] == before[tokens] + 7
    assert after['jaxfire:num_slots{model_name="jaxfire"}'] == 4


def test_a_client_that_leaves_mid_stream_frees_its_slot(served, monkeypatch):
    import http.client
    import time

    url, engine, _ = served
    cancelled = []
    cancel = jaxfire.Request.cancel
    monkeypatch.setattr(jaxfire.Request, "cancel", lambda self: cancelled.append(self.id) or cancel(self))
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 50, "stream": True,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.fp.readline()  # the first chunk has come
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 60
    while (not cancelled or engine.free_slots < engine.slots) and time.time() < deadline:
        time.sleep(0.05)
    assert cancelled and engine.free_slots == engine.slots


def test_a_body_that_is_not_json_gets_400(url):
    req = urllib.request.Request(url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    code, said = refusal(lambda: urllib.request.urlopen(req, timeout=30))
    assert code == 400 and "not JSON" in said


def test_an_oversized_body_is_refused_unread(served):
    server = CompletionServer(served[1], port=0, limits=Limits(max_body_bytes=64))
    server.serve_in_thread()
    try:
        code, said = refusal(post, f"http://127.0.0.1:{server.server_address[1]}", {"prompt": "x" * 100})
        assert code == 413 and "more than the 64 accepted" in said
    finally:
        server.shutdown()
        server.server_close()


def test_logprobs_are_the_models(url, model):
    import numpy as np

    out = post(url, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0, "ignore_eos": True})
    lp = out["choices"][0]["logprobs"]
    ids = model.tokenizer.encode(PROMPT)
    want = jaxfire.generate(model, [PROMPT], max_new_tokens=5)
    np.testing.assert_allclose(lp["token_logprobs"], want.logprobs[0], rtol=1e-4, atol=1e-5)
    assert "".join(lp["tokens"]) == out["choices"][0]["text"] == want.texts[0] and len(ids) > 0
    assert lp["text_offset"][0] == 0 and lp["top_logprobs"] is None
    chunks = sse_chunks(post(url, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0,
                                   "stream": True, "ignore_eos": True}, raw=True))
    assert [c["choices"][0]["logprobs"]["token_logprobs"][0] for c in chunks] == lp["token_logprobs"]


def test_an_ending_stop_id_is_listed_nowhere(url, model):
    """A stop id ends the completion without being output: neither the whole response nor the last
    streamed chunk lists its log-probability."""
    full = jaxfire.generate(model, [PROMPT], max_new_tokens=8)
    stop_id = full.tokens[0][3]
    cut = full.tokens[0].index(stop_id)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0, "stop_token_ids": [stop_id]}
    whole = post(url, body)["choices"][0]
    assert whole["finish_reason"] == "stop" and len(whole["logprobs"]["token_logprobs"]) == cut
    chunks = sse_chunks(post(url, {**body, "stream": True}, raw=True))
    listed = [c["choices"][0]["logprobs"] for c in chunks]
    assert len(chunks) == cut + 1 and listed[-1] is None and None not in listed[:-1]


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


def chat(url, body, raw=False):
    return post(url, body, raw, route="/v1/chat/completions")


def test_chat_completion_equals_generate_of_the_templated_prompt(chat_url, model):
    ids = ChatTemplate(CHAT_TEMPLATE, model.tokenizer.special_tokens(1, 2)).render(MESSAGES)
    ids = model.tokenizer.encode(ids, add_special_tokens=False)
    assert ids[0] == 1 and ids[1] != 1  # one BOS, the template's
    want = jaxfire.generate(model, [ids], max_new_tokens=10)
    assert len(want.tokens[0]) == 10  # no EOS before the limit, so ignore_eos below changes nothing
    out = chat(chat_url, {"model": "jaxfire", "messages": MESSAGES, "max_tokens": 10, "temperature": 0,
                          "ignore_eos": True, "logprobs": True})
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want.texts[0]}
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10, "total_tokens": len(ids) + 10}
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == want.texts[0]
    assert [c["bytes"] for c in content] == [list(c["token"].encode()) for c in content]
    import numpy as np
    np.testing.assert_allclose([c["logprob"] for c in content], want.logprobs[0], rtol=1e-4, atol=1e-5)

    # streamed as vLLM's benchmark_serving.py (backend "openai-chat") asks for it
    body = {"model": "jaxfire", "messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                                             for m in MESSAGES],
            "temperature": 0.0, "max_completion_tokens": 10, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    chunks = sse_chunks(chat(chat_url, body, raw=True))
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and len(deltas) == 10
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d["content"] for d in deltas) == want.texts[0]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 9 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_a_chat_without_max_tokens_may_fill_the_slot(served, chat_url, model):
    engine = served[1]
    out = chat(chat_url, {"messages": MESSAGES, "temperature": 0, "ignore_eos": True})
    usage = out["usage"]
    assert usage["total_tokens"] == engine.max_len and out["choices"][0]["finish_reason"] == "length"
    code, said = refusal(chat, chat_url, {"messages": [{"role": "user", "content": "x" * engine.max_len}]})
    assert code == 400 and "leaves no room for a reply" in said


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 4}, "'messages' is required"),
    ({"messages": MESSAGES, "prompt": PROMPT}, "unsupported field 'prompt'"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": -1}, "'top_logprobs' must be an integer in [0, 20]"),
    ({"messages": MESSAGES, "logprobs": 1}, "'logprobs' must be true or false"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_tokens must be an integer of at least 1"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles must alternate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text is supported"),
    ({"messages": "hello"}, "non-empty list"),
])
def test_bad_chat_requests_get_400_naming_the_problem(chat_url, body, message):
    code, said = refusal(chat, chat_url, body)
    assert code == 400 and message in said


def test_a_model_without_a_chat_template_says_so(url):
    code, said = refusal(chat, url, {"messages": MESSAGES})
    assert code == 400 and "--chat-template" in said


def test_alternatives_per_token(url, chat_url):
    """Completions' logprobs N and chat's top_logprobs N list the N likeliest tokens at each position,
    most likely first: a greedy token is the first, with its own log-probability."""
    out = post(url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3, "ignore_eos": True})
    lp = out["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == 4
    for token, value, alternatives in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(alternatives) <= 3 and next(iter(alternatives)) == token
        assert alternatives[token] == pytest.approx(value) and list(alternatives.values()) == \
            sorted(alternatives.values(), reverse=True)
    chunks = sse_chunks(post(url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3,
                                   "stream": True, "ignore_eos": True}, raw=True))
    assert [c["choices"][0]["logprobs"]["top_logprobs"][0] for c in chunks] == lp["top_logprobs"]

    out = chat(chat_url, {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True,
                          "top_logprobs": 2, "ignore_eos": True})
    for entry in out["choices"][0]["logprobs"]["content"]:
        top = entry["top_logprobs"]
        assert len(top) == 2 and top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"]
        assert top[1]["logprob"] <= top[0]["logprob"] and top[1]["bytes"] == list(top[1]["token"].encode())


def test_an_api_key_guards_the_v1_routes(served):
    engine = served[1]
    server = CompletionServer(engine, port=0, api_key="sekret")
    server.serve_in_thread()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            req = urllib.request.Request(url + "/v1/completions", headers=headers,
                                         data=json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode())
            code, said = refusal(lambda: urllib.request.urlopen(req, timeout=30))
            assert code == 401 and "API key" in said
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/v1/models", timeout=30)
        assert err.value.code == 401
        req = urllib.request.Request(url + "/v1/completions", headers={"Authorization": "Bearer sekret"},
                                     data=json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] <= 2
        for open_route in ("/health", "/metrics"):
            with urllib.request.urlopen(url + open_route, timeout=30) as resp:
                assert resp.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_command_serves_and_stops_on_sigterm():
    """`python -m jaxfire.server` end to end: it prints the port it took, answers with its API key from
    the environment, and exits cleanly on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "jaxfire.server", "--port", "0", "--slots", "2", "--max-len", "64",
                             "--no-warmup"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAXFIRE_API_KEY": "k"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving builtin on http://127.0.0.1:"), "".join(lines)
        base = lines[-1].split()[3].removesuffix("/v1/completions")
        req = urllib.request.Request(base + "/v1/completions", headers={"Authorization": "Bearer k"},
                                     data=json.dumps({"prompt": PROMPT, "max_tokens": 3, "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.stdout.close()
