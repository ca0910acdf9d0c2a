"""Chat templates render as transformers' apply_chat_template renders them, are found where a tokenizer
directory keeps them, and refuse bad messages or templates with one clear error."""

from __future__ import annotations

import json

import pytest

from jaxfire.chat import ChatTemplate, ChatTemplateError
from jaxfire.tokenizer import Tokenizer, TokenizerError, byte_level_tokenizer
from tests.hf_models import CHAT_TEMPLATE

CHATML = ("{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{% generation %}{{ m['content'] }}{% endgeneration %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Block tags on lines of their own, indented, without "-": renders right only with trim_blocks and
# lstrip_blocks, as most published templates assume.
INDENTED = """{% for message in messages %}
    {% if message['role'] == 'system' %}
<|system|>
{{ message['content'] }}{{ eos_token }}
    {% else %}
<|{{ message['role'] }}|>
{{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""
JSON_DUMP = "{{ bos_token }}{{ messages | tojson }}{% if add_generation_prompt %}{{ eos_token }}{% endif %}"

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello <b>&</b> é"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "  spaces\nand lines  "}],
]


def hf_tokenizer_dir(tmp_path, template):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", chat_template=template).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHATML, INDENTED, JSON_DUMP],
                         ids=["mixtral", "chatml", "indented", "tojson"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_and_encode_as_transformers_does(tmp_path, template, add_generation_prompt):
    from transformers import AutoTokenizer

    directory = hf_tokenizer_dir(tmp_path, template)
    hf = AutoTokenizer.from_pretrained(directory)
    ours = Tokenizer.from_dir(directory)
    for messages in CONVERSATIONS + [CONVERSATIONS[1] + [{"role": "tool", "content": "skipped by chatml"}]]:
        if template is CHAT_TEMPLATE and messages[-1]["role"] == "tool":
            continue
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.chat_template.render(messages, add_generation_prompt) == want
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        assert ours.encode_chat(messages, add_generation_prompt) == list(ids["input_ids"])
    # the template wrote BOS itself: encoding must not add a second one
    if template in (CHAT_TEMPLATE, JSON_DUMP):
        assert ours.encode_chat(CONVERSATIONS[0])[:2] != [1, 1]


def test_text_parts_join_as_one_content():
    template = ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"})
    parts = [{"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "two"}]}]
    assert template.render(parts) == template.render([{"role": "user", "content": "line one\ntwo"}])


def test_where_a_directory_keeps_its_template(tmp_path):
    tokenizer_json = tmp_path / "tokenizer.json"
    byte_level_tokenizer().save(str(tokenizer_json))
    assert ChatTemplate.from_dir(tmp_path) is None
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
              "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": JSON_DUMP}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    found = ChatTemplate.from_dir(tmp_path)
    assert found.source == JSON_DUMP and found.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    assert ChatTemplate.from_dir(tmp_path).source == CHATML
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert ChatTemplate.from_dir(tmp_path).source == CHAT_TEMPLATE  # the newest format first


def test_special_tokens_fall_back_to_the_model_ids(tmp_path):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.special_tokens() == {}
    assert tok.special_tokens(bos_token_id=1, eos_token_id=2) == {"bos_token": "<s>", "eos_token": "</s>"}
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.encode_chat(CONVERSATIONS[0])
    tok.chat_template = ChatTemplate(CHAT_TEMPLATE).with_special_tokens(tok.special_tokens(1, 2))
    assert tok.encode_chat(CONVERSATIONS[0])[0] == 1


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "refused the messages: roles must alternate"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "no role"}], r"messages\[0\] must be an object with a string 'role'"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text is supported"),
])
def test_bad_messages_get_one_error(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}).render(messages)


def test_a_broken_template_is_named(tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ChatTemplateError, match=f"{path} is not a valid Jinja template"):
        ChatTemplate.from_file(path)
    with pytest.raises(ChatTemplateError, match="cannot read chat template"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")
    # the sandbox holds: a template cannot reach Python's internals
    with pytest.raises(ChatTemplateError, match="refused"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(CONVERSATIONS[0])
