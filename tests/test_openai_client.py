"""The official `openai` package against the server: completions and chat, whole and streamed, with and
without an API key, give jaxfire.generate's text; a wrong key is the client's AuthenticationError."""

from __future__ import annotations

import pytest

import jaxfire
from jaxfire.chat import ChatTemplate
from jaxfire.server import CompletionServer
from tests.hf_models import CHAT_TEMPLATE

openai = pytest.importorskip("openai")

PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def model():
    return jaxfire.load(dtype="float32")


@pytest.fixture(scope="module")
def servers(model):
    """The built-in model with a chat template, served without a key and with the key "sekret"."""
    engine = jaxfire.Engine(model, slots=4, max_len=64).start()
    template = ChatTemplate(CHAT_TEMPLATE).with_special_tokens(model.tokenizer.special_tokens(1, 2))
    servers = {key: CompletionServer(engine, port=0, chat_template=template, api_key=key) for key in (None, "sekret")}
    for server in servers.values():
        server.serve_in_thread()
    yield {key: f"http://127.0.0.1:{s.server_address[1]}/v1" for key, s in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()
    engine.close()


@pytest.mark.parametrize("key", [None, "sekret"])
def test_completions_whole_and_streamed(servers, model, key):
    client = openai.OpenAI(base_url=servers[key], api_key=key or "unused", max_retries=0)
    want = jaxfire.generate(model, [PROMPT], max_new_tokens=8)
    out = client.completions.create(model="jaxfire", prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == want.texts[0] and out.usage.completion_tokens == 8
    stream = client.completions.create(model="jaxfire", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream) == want.texts[0]
    two = client.completions.create(model="jaxfire", prompt=[PROMPT, PROMPT], max_tokens=8, temperature=0)
    assert [c.text for c in two.choices] == [want.texts[0]] * 2


@pytest.mark.parametrize("key", [None, "sekret"])
def test_chat_whole_and_streamed(servers, model, key):
    client = openai.OpenAI(base_url=servers[key], api_key=key or "unused", max_retries=0)
    out = client.chat.completions.create(model="jaxfire", messages=MESSAGES, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)
    template = ChatTemplate(CHAT_TEMPLATE).with_special_tokens(model.tokenizer.special_tokens(1, 2))
    ids = model.tokenizer.encode_chat(MESSAGES, True, template)
    want = jaxfire.generate(model, [ids], max_new_tokens=8)
    assert out.choices[0].message.content == want.texts[0] and out.choices[0].message.role == "assistant"
    assert [c.logprob for c in out.choices[0].logprobs.content] == pytest.approx(want.logprobs[0][:len(
        out.choices[0].logprobs.content)], rel=1e-4, abs=1e-5)
    stream = client.chat.completions.create(model="jaxfire", messages=MESSAGES, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.texts[0]
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_a_wrong_key_is_an_authentication_error_and_a_refusal_a_bad_request(servers):
    client = openai.OpenAI(base_url=servers["sekret"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="jaxfire", prompt=PROMPT, max_tokens=2)
    client = openai.OpenAI(base_url=servers["sekret"], api_key="sekret", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="response_format 'json_object' is not supported"):
        client.chat.completions.create(model="jaxfire", messages=MESSAGES, response_format={"type": "json_object"})
    assert [m.id for m in client.models.list()] == ["jaxfire"]


def test_logit_bias_forces_a_token(servers, model):
    """The client's logit_bias (token id strings to numbers) reaches the sampler: +100 makes every token
    the biased one, in completions and chat alike."""
    client = openai.OpenAI(base_url=servers[None], api_key="unused", max_retries=0)
    want = jaxfire.generate(model, [PROMPT], max_new_tokens=4).tokens[0]
    forced = next(t for t in range(300, 400) if t not in want)  # merges of ASCII: whole characters
    text = model.tokenizer.decode([forced] * 4)
    out = client.completions.create(model="jaxfire", prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100})
    assert out.choices[0].text == text
    reply = client.chat.completions.create(model="jaxfire", messages=MESSAGES, max_tokens=4, temperature=0,
                                           logit_bias={str(forced): 100})
    assert reply.choices[0].message.content == text
