"""Model configuration: one frozen, hashable dataclass, named presets, and the Hugging Face reader.

`Config` is passed to jitted functions as a static argument, so it holds only hashable values and
never changes after construction.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxfire.errors import JaxfireError


class ConfigError(JaxfireError):
    """A configuration jaxfire cannot serve correctly."""


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F, per expert
    num_layers: int  # L
    num_heads: int  # H, query heads
    num_kv_heads: int  # G, key/value heads
    head_dim: int  # K
    num_experts: int  # E
    num_experts_per_tok: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "num_experts", "num_experts_per_tok")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_experts ({self.num_experts})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if not isinstance(self.eos_token_ids, tuple):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}")
        d = dict(d)
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> "Config":
        """Reads a Hugging Face Mixtral `config.json` (a path to it, to its directory, or the dict)."""
        hf = _read_json_source(source)
        return _config_from_hf(hf)

    @classmethod
    def preset(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    def param_count(self) -> int:
        from jaxfire import params  # local import: params depends on config

        return params.param_count(self)


def _read_json_source(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json found at {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


_SUPPORTED_ROPE_TYPES = (None, "default")


def _config_from_hf(hf: dict[str, Any]) -> Config:
    model_type = hf.get("model_type")
    if model_type != "mixtral":
        raise ConfigError(f"not a Mixtral config: model_type is {model_type!r}, expected 'mixtral'")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported; Mixtral uses 'silu'")

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; only default rotary embeddings are")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))

    heads = hf.get("num_attention_heads", 32)
    kv_heads = hf.get("num_key_value_heads") or heads
    hidden = hf.get("hidden_size", 4096)
    head_dim = hf.get("head_dim") or hidden // heads
    eos = hf.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    pad = hf.get("pad_token_id")
    try:
        return Config(
            vocab_size=hf.get("vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=hf.get("intermediate_size", 14336),
            num_layers=hf.get("num_hidden_layers", 32),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            num_experts=hf.get("num_local_experts", hf.get("num_experts", 8)),
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            sliding_window=hf.get("sliding_window"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0),
        )
    except TypeError as e:
        raise ConfigError(f"malformed Mixtral config: {e}") from None


PRESETS: dict[str, Config] = {
    "mixtral-8x7b": Config(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, num_experts=8, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=32768),
    "mixtral-8x22b": Config(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48,
        num_kv_heads=8, head_dim=128, num_experts=8, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=65536),
    "tiny": Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, rope_theta=1e4,
        max_position_embeddings=512),
}
