"""Chat templates: a list of messages rendered into the prompt text an instruction-tuned model expects.

A Hugging Face tokenizer directory carries the template as Jinja source, in `chat_template.jinja`,
`chat_template.json` or the `chat_template` field of `tokenizer_config.json` (looked for in that
order, as `transformers` does). It renders the way `transformers`' `apply_chat_template` renders it
(a sandboxed environment with `trim_blocks` and `lstrip_blocks`, loop controls, its `tojson` filter,
`raise_exception` and `strftime_now`, the special tokens as variables), so a converted checkpoint
prompts its model exactly as the original does. The rendered text starts with whatever special
tokens the template writes (Mixtral's writes `<s>`): encode it without adding them again.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from typing import Any, Sequence

from jaxfire.errors import JaxfireError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(JaxfireError):
    pass


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; here it
        only renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own filter escapes HTML characters, which a prompt must not have.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    return env


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken as tokenizer_config.json writes it
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template and the special tokens it may name."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "the chat template"):
        import jinja2

        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin} is not a valid Jinja template: {e} (line {e.lineno})") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, special_tokens: dict[str, str] | None = None) -> "ChatTemplate":
        path = pathlib.Path(path)
        try:
            source = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read chat template {path}: {e}") from None
        return cls(source, special_tokens, origin=str(path))

    def with_special_tokens(self, special_tokens: dict[str, str]) -> "ChatTemplate":
        """The same template naming these special tokens, its own where both name one."""
        other = object.__new__(ChatTemplate)
        other.__dict__.update(self.__dict__, special_tokens={**special_tokens, **self.special_tokens})
        return other

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "ChatTemplate | None":
        """The template of a tokenizer directory, or None where it has none."""
        directory = pathlib.Path(directory)
        config = _read_json(directory / "tokenizer_config.json")
        special = special_tokens(directory)
        if (directory / "chat_template.jinja").is_file():
            return cls.from_file(directory / "chat_template.jinja", special)
        source, origin = _read_json(directory / "chat_template.json").get("chat_template"), "chat_template.json"
        if source is None:
            source, origin = config.get("chat_template"), "tokenizer_config.json"
        if isinstance(source, list):  # named templates: the default one serves chat
            source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}.get("default")
        if not isinstance(source, str):
            return None
        return cls(source, special, origin=f"the chat template of {directory / origin}")

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for these messages, each {"role": str, "content": str or a list of text parts};
        with `add_generation_prompt`, ending where the assistant's reply begins."""
        import jinja2

        messages = check_messages(messages)
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:  # raise_exception() in the template, or an error it ran into
            raise ChatTemplateError(f"{self.origin} refused the messages: {e}") from None


def special_tokens(directory: str | os.PathLike) -> dict[str, str]:
    """The special tokens a tokenizer directory names ({"bos_token": "<s>", ...}), as templates see them."""
    directory = pathlib.Path(directory)
    special = {}
    for source in (_read_json(directory / "tokenizer_config.json"), _read_json(directory / "special_tokens_map.json")):
        for name in SPECIAL_TOKENS:
            if (text := _token_text(source.get(name))) is not None:
                special.setdefault(name, text)
    return special


def check_messages(messages: Any) -> list[dict]:
    """The messages with each content as one string (text parts joined by newlines, as vLLM joins them);
    raises ChatTemplateError naming the first bad message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ChatTemplateError(f"messages[{i}].content has a part that is not text; only text is "
                                            "supported")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({**message, "content": content})
    return out


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}") from None
    return value if isinstance(value, dict) else {}
