"""Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` library, and the directory's
chat template (`jaxfire.chat`) for prompts given as messages.

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

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the messages as the chat template renders them (its own special tokens only)."""
        if self.chat_template is None:
            raise TokenizerError(f"the tokenizer in {self.path.parent} has no chat template; give one "
                                 "(a Jinja file) to chat with this model")
        return self.encode(self.chat_template.render(messages, add_generation_prompt), add_special_tokens=False)

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
