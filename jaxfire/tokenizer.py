"""Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` library, the directory's chat
template (`jaxfire.chat`) for prompts given as messages, and `StreamDecoder`, the text of a growing
output one token at a time.

A checkpoint without tokenizer files loads with `tokenizer = None` and works on token ids.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Sequence

from jaxfire.chat import ChatTemplate, special_tokens
from jaxfire.errors import JaxfireError


class TokenizerError(JaxfireError):
    pass


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = pathlib.Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust library raises its own exception type
            raise TokenizerError(f"cannot read tokenizer {self.path}: {e}") from None

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "Tokenizer | None":
        path = pathlib.Path(directory) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    @functools.cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The template beside tokenizer.json, read on first use (a broken one fails chat, not loading);
        None where there is none. Assign a `ChatTemplate` to replace it."""
        return ChatTemplate.from_dir(self.path.parent)

    def special_tokens(self, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, str]:
        """The special tokens a chat template may name: the directory's, with BOS and EOS from these ids
        where its files name none."""
        tokens = special_tokens(self.path.parent)
        for name, i in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
            if name not in tokens and i is not None and (text := self._tok.id_to_token(i)) is not None:
                tokens[name] = text
        return tokens

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    template: ChatTemplate | None = None) -> list[int]:
        """Token ids of the messages as the chat template (`template`, else the tokenizer's own) renders
        them, with only the special tokens it writes."""
        template = template or self.chat_template
        if template is None:
            raise TokenizerError(f"the tokenizer in {self.path.parent} has no chat template; give one "
                                 "(a Jinja file) to chat with this model")
        return self.encode(template.render(messages, add_generation_prompt), add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens (such as BOS) are added as the tokenizer's own template says."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class StreamDecoder:
    """Incremental text of a growing id list, emitting only text that no later token can change.

    Each push decodes two short windows, not the whole list: the ids not yet emitted with the ones
    emitted last before them (context such as a word's leading space), with and without the new id;
    the text the new window adds is the delta. Constant work a token however long the output (a whole
    decode per token cost 0.3 s of the scheduling thread over a 2000-token output).

    With stop strings, text is also held back until no stop string can begin in it (the last
    len(longest stop) - 1 characters wait for the next token), and `stream` says when one appeared.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window's start: the ids emitted last, kept as context
        self.read = 0  # ids before this are emitted
        self.stop = stop
        self.held = ""  # decoded text not yet emitted: a stop string may start in it

    def push(self, token: int, final: bool) -> str | None:
        if self.tok is None:
            return None
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        # Nothing new yet, or an incomplete UTF-8 sequence: wait for more ids (unless this is the last).
        if not final and (len(text) <= len(before) or text.endswith("\ufffd") or not text.startswith(before)):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(os.path.commonprefix([before, text])):]  # the emitted text is never repeated

    def stream(self, token: int, final: bool, stops: bool = True) -> tuple[str | None, bool]:
        """The text to emit for this token, and whether it completed a stop string (the text then ends
        before the stop string). With `stops` False (a request short of its min_tokens) no stop string
        is looked for and nothing is held back."""
        delta = self.push(token, final)
        if delta is None or not self.stop:
            return delta, False
        text = self.held + delta
        if not stops:
            self.held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = 0 if final else min(len(text), max(map(len, self.stop)) - 1)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str | None:
        """The held-back text, at an end that is not a stop string."""
        if self.tok is None:
            return None
        held, self.held = self.held, ""
        return held


BYTE_LEVEL_SPECIAL = ["<unk>", "<s>", "</s>"]


def byte_level_tokenizer():
    """A byte-level tokenizer with no merges: ids 0-2 special, 3-258 the 256 bytes; BOS added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {tok: i for i, tok in enumerate(BYTE_LEVEL_SPECIAL)}
    vocab.update({ch: len(BYTE_LEVEL_SPECIAL) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(BYTE_LEVEL_SPECIAL)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok
