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
    ({"prompt": PROMPT, "presence_penalty": 3}, "presence_penalty must be a number in [-2, 2], got 3"),
    ({"prompt": PROMPT, "repetition_penalty": True}, "'repetition_penalty': Input should be a valid number"),
    ({"prompt": PROMPT, "max_tokens": 2, "min_tokens": 3}, "min_tokens must be an integer in [0, max_tokens (2)]"),
])
def test_bad_requests_get_400_naming_the_problem(url, body, message):
    code, said = refusal(post, url, body)
    assert code == 400 and message in said


@pytest.mark.parametrize("args, message", [
    (["--compile-workers", "0"], "--compile-workers must be at least 1"),
    (["--contiguous", "--compile-workers", "4"], "--compile-workers is the paged engine's: leave out --contiguous"),
])
def test_server_usage_errors(args, message, capsys):
    from jaxfire.server.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_penalties_reach_the_engine(url, served, model):
    """A completion with sampling penalties gives the tokens the engine gives for them; left out, none
    are passed (the engine's neutral defaults)."""
    from jaxfire.server import protocol

    assert "presence_penalty" not in protocol.completion_call({"prompt": PROMPT}).kwargs
    assert protocol.completion_call({"prompt": PROMPT, "min_tokens": 3}).kwargs["min_tokens"] == 3
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1, "repetition_penalty": 1.3}
    assert protocol.chat_call({"messages": MESSAGES, **penalties}).kwargs.items() >= penalties.items()
    out = post(url, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **penalties})
    ids = model.tokenizer.encode(PROMPT)
    want = served[1].submit(ids, max_tokens=8, ignore_eos=True, **penalties).result(timeout=120)
    assert want != served[1].submit(ids, max_tokens=8, ignore_eos=True).result(timeout=120)  # they bite
    assert out["choices"][0]["text"] == model.tokenizer.decode(want)


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


def test_logit_bias_forces_and_bans_tokens(url, chat_url, model):
    """A completion's logit_bias of +100 makes every token the biased one, whose log-probability is then
    the biased distribution's (certain); a chat's -100 on the reply's first token changes the reply."""
    tok = model.tokenizer
    want = jaxfire.generate(model, [PROMPT], max_new_tokens=4)
    forced = next(t for t in range(300, 400) if t not in want.tokens[0])  # merges of ASCII: whole characters
    out = post(url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1,
                     "logit_bias": {str(forced): 100}})
    choice = out["choices"][0]
    assert choice["text"] == tok.decode([forced] * 4)
    assert all(-1e-3 < v <= 0 for v in choice["logprobs"]["token_logprobs"])
    assert [list(top) for top in choice["logprobs"]["top_logprobs"]] == [[tok.decode([forced])]] * 4

    ids = tok.encode(ChatTemplate(CHAT_TEMPLATE, tok.special_tokens(1, 2)).render(MESSAGES), add_special_tokens=False)
    reply = jaxfire.generate(model, [ids], max_new_tokens=4)
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    assert chat(chat_url, body)["choices"][0]["message"]["content"] == reply.texts[0]
    banned = chat(chat_url, {**body, "logit_bias": {str(reply.tokens[0][0]): -100}})
    assert banned["choices"][0]["message"]["content"] != reply.texts[0]


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


def test_the_server_command_serves_and_drains_on_sigterm():
    """`python -m jaxfire.server` end to end: it prints the port it took, answers with its API key from
    the environment, and on SIGTERM refuses new requests (503), finishes the one in flight and exits 0."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "jaxfire.server", "--port", "0", "--slots", "2", "--max-len", "256",
                             "--no-warmup"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAXFIRE_API_KEY": "k"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving builtin on http://127.0.0.1:"), "".join(lines)
        assert any(line.startswith("compilation cache: ") for line in lines), "".join(lines)
        base = lines[-1].split()[3].removesuffix("/v1/completions")
        key = {"Authorization": "Bearer k", "Content-Type": "application/json"}
        req = urllib.request.Request(base + "/v1/completions", headers=key,
                                     data=json.dumps({"prompt": PROMPT, "max_tokens": 3, "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
        import http.client
        conn = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                                                            "stream": True}), key)
        stream = conn.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        code = 200
        while code == 200:  # until the signal has been handled
            try:
                urllib.request.urlopen(base + "/health", timeout=30)
            except urllib.error.HTTPError as e:
                code = e.code
        assert code == 503
        assert refusal(lambda: urllib.request.urlopen(req, timeout=30))[0] == 503
        chunks = sse_chunks(stream.read().decode())
        assert len(chunks) == 199 and chunks[-1]["choices"][0]["finish_reason"] == "length"
        conn.close()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read().strip().endswith("stopped")
    finally:
        proc.kill()
        proc.stdout.close()


def test_prompt_lists_and_n_choices_are_engine_requests(url, model):
    """A list of prompts (strings or ids) and n > 1: choice i * n + j is prompt i sampled with seed + j."""
    prompts = [PROMPT, "class Stack:"]
    want = {(i, j): jaxfire.generate(model, [p], max_new_tokens=6, temperature=0.9, seed=7 + j).texts[0]
            for i, p in enumerate(prompts) for j in range(2)}
    assert want[0, 0] != want[0, 1]  # the seeds differ
    for sent in (prompts, [model.tokenizer.encode(p) for p in prompts]):
        out = post(url, {"prompt": sent, "n": 2, "max_tokens": 6, "temperature": 0.9, "seed": 7, "ignore_eos": True})
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in out["choices"]] == [want[k] for k in sorted(want)]
        assert out["usage"]["prompt_tokens"] == sum(len(model.tokenizer.encode(p)) for p in prompts)
        assert out["usage"]["completion_tokens"] == 24
    chunks = sse_chunks(post(url, {"prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0.9, "seed": 7,
                                   "ignore_eos": True, "stream": True}, raw=True))
    for k, key in enumerate(sorted(want)):
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == k) == want[key]


def _reference_logprobs(model, ids):
    import jax
    import numpy as np

    lp = np.asarray(jax.nn.log_softmax(jaxfire.logits(model, [ids])[0], axis=-1))  # [T, V]
    return [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)], [int(np.argmax(lp[t])) for t in range(len(ids) - 1)]


def test_echo_lists_the_prompts_log_probabilities(url, model):
    """lm-eval's loglikelihood request (echo, logprobs 1, max_tokens 1) and echo alone (max_tokens 0):
    the prompt's tokens with their log-probabilities under the model's forward pass, the first none."""
    import numpy as np

    ids = model.tokenizer.encode(PROMPT + " return n")
    values, greedy = _reference_logprobs(model, ids)
    out = post(url, {"prompt": [ids, ids[:5]], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], values, rtol=1e-4, atol=1e-4)
    tok = model.tokenizer
    assert [next(iter(top)) for top in lp["top_logprobs"][1:-1]] == [tok.decode([g], skip_special_tokens=False)
                                                                     for g in greedy]
    next_id = jaxfire.generate(model, [ids], max_new_tokens=1).tokens[0][0]
    assert lp["tokens"][-1] == tok.decode([next_id], skip_special_tokens=False)
    assert out["choices"][0]["text"] == tok.decode(ids) + out["choices"][0]["text"][len(tok.decode(ids)):]
    short = out["choices"][1]["logprobs"]["token_logprobs"]
    np.testing.assert_allclose(short[1:-1], values[:4], rtol=1e-4, atol=1e-4)

    only = post(url, {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 0})
    choice = only["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(tok.encode(PROMPT)) and only["usage"]["completion_tokens"] == 0
    offsets, tokens = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
    assert offsets[:2] == [0, 0]  # BOS is not in the text
    assert [PROMPT[a:b] for a, b in zip(offsets[1:], offsets[2:] + [len(PROMPT)])] == tokens[1:]
    streamed = sse_chunks(post(url, {"prompt": PROMPT, "echo": True, "max_tokens": 3, "temperature": 0, "stream": True,
                                     "ignore_eos": True}, raw=True))
    want = jaxfire.generate(model, [PROMPT], max_new_tokens=3).texts[0]
    assert streamed[0]["choices"][0]["text"] == PROMPT
    assert "".join(c["choices"][0]["text"] for c in streamed) == PROMPT + want


@pytest.mark.parametrize("route, body, message", [
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"x": 10}},
     "'logit_bias' keys must be token ids (integers as strings), got 'x'"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": "a"}}, "'logit_bias' must be an object of token ids"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": 101}},
     "logit_bias of token 5 is 101.0, not a number in [-100, 100]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"4096": 1}},
     "logit_bias has 4096, not a token id in [0, 4096)"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"-1": 1}}, "logit_bias has -1, not a token id"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["x"] * 17}, "'stop' has 17 strings, more than the server's limit of 16"),
    ("/v1/completions", {"prompt": PROMPT, "stop": "y" * 257}, "limit of 256 characters"),
    ("/v1/completions", {"prompt": [PROMPT] * 5, "n": 16}, "make 80 choices, more than the server's limit of 64"),
    ("/v1/completions", {"prompt": "z " * 200}, "more than the server's limit of 64 prompt tokens"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "'prompt' is an empty list"),
    ("/v1/completions", {"prompt": PROMPT, "seed": 2**32}, "'seed' must be an integer in [0, 2**32)"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"x": 1}}, "unsupported field 'stream_options.x'"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": 5}, "'stream_options' must be an object such as"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [1]}, "'stop' must be a string or a list of strings"),
    ("/v1/completions", [PROMPT], "the request body must be a JSON object"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}},
     "response_format 'json_object' is not supported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools (function calling) are not supported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 0}, "'n' must be an integer in [1, 16]"),
    ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, "either 'prompt' or 'messages'"),
    ("/detokenize", {"tokens": [1, 10**6]}, "outside the vocabulary"),
])
def test_refused_fields_and_limits_name_themselves(chat_url, route, body, message):
    code, said = refusal(post, chat_url, body, False, route)
    assert code == 400 and message in said


def test_user_is_ignored_and_a_text_response_format_is_plain_chat(chat_url):
    out = chat(chat_url, {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "user": "u-1",
                          "response_format": {"type": "text"}, "tool_choice": "none"})
    plain = chat(chat_url, {"messages": MESSAGES, "max_tokens": 3, "temperature": 0})
    assert out["choices"][0]["message"] == plain["choices"][0]["message"]


def test_tokenize_detokenize_and_version(chat_url, model):
    ids = post(chat_url, {"prompt": PROMPT}, route="/tokenize")
    assert ids["tokens"] == model.tokenizer.encode(PROMPT) and ids["count"] == len(ids["tokens"])
    assert ids["max_model_len"] == 64
    bare = post(chat_url, {"prompt": PROMPT, "add_special_tokens": False}, route="/tokenize")["tokens"]
    assert bare == model.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert post(chat_url, {"tokens": bare}, route="/detokenize")["prompt"] == PROMPT
    templated = post(chat_url, {"messages": MESSAGES}, route="/tokenize")["tokens"]
    assert templated[0] == 1 and len(templated) > len(bare)
    with urllib.request.urlopen(chat_url + "/version", timeout=30) as resp:
        assert json.loads(resp.read())["version"] == jaxfire.__version__
    with urllib.request.urlopen(chat_url + "/tokenizer_info", timeout=30) as resp:
        assert json.loads(resp.read())["eos_token"] == "</s>"


def _open_stream(url, body):
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the first chunk has come
    return conn, resp


def test_beyond_max_concurrent_requests_the_server_answers_429(served):
    server = CompletionServer(served[1], port=0, max_concurrent_requests=1)
    server.serve_in_thread()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        conn, resp = _open_stream(url, {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True})
        with pytest.raises(urllib.error.HTTPError) as err:
            post(url, {"prompt": PROMPT, "max_tokens": 2})
        assert err.value.code == 429 and err.value.headers["Retry-After"] == "1"
        assert "--max-concurrent-requests" in json.loads(err.value.read())["error"]["message"]
        assert sse_chunks(resp.read().decode())  # the first one still finishes
        conn.close()
        assert post(url, {"prompt": PROMPT, "max_tokens": 2})["choices"]  # admitted again
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_past_its_timeout_is_cancelled_with_504(served):
    engine = served[1]
    server = CompletionServer(engine, port=0, request_timeout=1e-4)
    server.serve_in_thread()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, said = refusal(post, url, {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True})
        assert code == 504 and "--request-timeout" in said
        chunks = post(url, {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "stream": True}, raw=True)
        assert "--request-timeout" in chunks and chunks.rstrip().endswith("data: [DONE]")
    finally:
        server.shutdown()
        server.server_close()
    import time
    deadline = time.time() + 30
    while engine.free_slots < engine.slots and time.time() < deadline:
        time.sleep(0.05)
    assert engine.free_slots == engine.slots


def test_a_drain_refuses_new_requests_and_lets_those_in_flight_finish(served):
    server = CompletionServer(served[1], port=0)
    thread = server.serve_in_thread()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        conn, resp = _open_stream(url, {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True})
        server.drain()
        code, said = refusal(post, url, {"prompt": PROMPT, "max_tokens": 2})
        assert code == 503 and "shutting down" in said
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/health", timeout=30)
        assert err.value.code == 503
        rest = sse_chunks(resp.read().decode())
        assert len(rest) == 39 and rest[-1]["choices"][0]["finish_reason"] == "length"
        conn.close()
        thread.join(timeout=30)
        assert not thread.is_alive()  # it stopped by itself once nothing was in flight
    finally:
        server.shutdown()
        server.server_close()


def test_a_burst_of_streamed_clients_is_answered_or_refused_with_429(served):
    """scripts/load_test.py at small scale: 60 streamed clients at once against a limit of 30 in flight,
    every third hanging up after its first chunk: no reset, no 5xx, and every slot free afterwards."""
    import asyncio
    import time

    from scripts import load_test

    engine = served[1]
    server = CompletionServer(engine, port=0, max_concurrent_requests=30)
    server.serve_in_thread()
    try:
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.7, "ignore_eos": True}
        tally = asyncio.run(load_test.run(server.server_address[1], 60, 60, body))
        assert load_test.check(tally, 60) == [] and tally["429"] > 0 and tally["ok"] > 0, tally
        assert load_test.idle(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    deadline = time.time() + 30
    while engine.free_slots < engine.slots and time.time() < deadline:
        time.sleep(0.05)
    assert engine.free_slots == engine.slots and server.in_flight == 0 and engine.stats().kv_pages_used == 0


def test_a_client_that_leaves_before_a_whole_answer_has_its_request_cancelled(served):
    import socket
    import time

    url, engine, _ = served
    before = engine.stats().finished.get("cancelled", 0)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 50, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 60
        while engine.stats().running == 0 and time.time() < deadline:
            time.sleep(0.01)  # until it holds a slot
    deadline = time.time() + 60
    while (engine.stats().finished.get("cancelled", 0) == before or engine.free_slots < engine.slots) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats().finished.get("cancelled", 0) == before + 1 and engine.free_slots == engine.slots


def test_a_stream_whose_client_is_gone_before_its_first_chunk_cancels_its_requests():
    import asyncio

    from jaxfire.server.app import _Stream

    class Held:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    started = []

    async def chunks():
        started.append(True)
        yield b"data: [DONE]\n\n"

    async def gone(message):  # the client left: the first send fails
        raise OSError("connection reset")

    async def receive():
        return {"type": "http.disconnect"}

    reqs = [Held(), Held()]
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/v1/completions",
             "headers": []}
    with pytest.raises(Exception):
        asyncio.run(_Stream(chunks(), reqs)(scope, receive, gone))
    assert not started and all(r.cancelled for r in reqs)
