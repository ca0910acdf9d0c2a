"""Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` library.

A checkpoint without tokenizer files loads with `tokenizer = None` and works on token ids.
"""

from __future__ import annotations

import os
import pathlib

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
