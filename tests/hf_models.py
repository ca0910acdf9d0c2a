"""Tiny random Hugging Face Mixtral models covering the configurations jaxfire must match.

Each entry: the MixtralConfig arguments, how it is saved, and its source dtype.
- "gqa": 4 query / 2 KV heads, top-2, safetensors with one tensor per expert (as checkpoints on disk).
- "mqa_window_tied": one KV head (MQA), top-1, sliding window, tied embeddings, explicit head_dim,
  legacy `rope_theta` key, and a tokenizer with a chat template (`CHAT_TEMPLATE`), saved by transformers.
- "mha_top3_bin": query heads == KV heads, top-3, PyTorch .bin with the fused expert layout.
- "sharded_bf16": bf16 safetensors split over several shards with an index.
- "ep8": 8 experts and 8 query / 4 KV heads, for meshes of up to 8 devices.
"""

from __future__ import annotations

import json
import pathlib

# Mixtral-Instruct's conversation format: an optional system message folded into the first user turn,
# roles alternating, each reply closed by EOS.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system = '' %}{%- set turns = messages %}\n"
    "{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in turns %}\n"
    "    {%- if (message['role'] == 'user') != loop.index0 is even %}\n"
    "        {{- raise_exception('roles must alternate user, assistant, user, ...') }}\n"
    "    {%- elif message['role'] == 'user' %}\n"
    "        {{- ' [INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}\n"
    "    {%- else %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")

MODELS = {
    "gqa": dict(
        hf=dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        format="safetensors"),
    "mqa_window_tied": dict(
        hf=dict(vocab_size=320, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=64, num_local_experts=4, num_experts_per_tok=1,
                sliding_window=6, tie_word_embeddings=True),
        format="safetensors", legacy_rope_theta=1e4, tokenizer=True),
    "mha_top3_bin": dict(
        hf=dict(vocab_size=131, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, num_local_experts=6, num_experts_per_tok=3,
                rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        format="bin"),
    "sharded_bf16": dict(
        hf=dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        format="safetensors", dtype="bfloat16", max_shard_size="40KB"),
    "ep8": dict(
        hf=dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
        format="safetensors"),
}


def build(name: str, seed: int = 0):
    """The random transformers model of entry `name`, float32, eager attention, in eval mode."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    spec = MODELS[name]
    cfg = MixtralConfig(max_position_embeddings=256, initializer_range=0.1, **spec["hf"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def save(name: str, out: pathlib.Path) -> pathlib.Path:
    import torch

    spec = MODELS[name]
    model = build(name)
    if spec.get("dtype") == "bfloat16":
        model = model.to(torch.bfloat16)
    if spec["format"] == "bin":
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        model.save_pretrained(out, max_shard_size=spec.get("max_shard_size", "50GB"))
    if "legacy_rope_theta" in spec:
        config_path = out / "config.json"
        cfg = json.loads(config_path.read_text())
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = spec["legacy_rope_theta"]
        config_path.write_text(json.dumps(cfg))
    if spec.get("tokenizer"):
        from transformers import PreTrainedTokenizerFast

        from jaxfire.tokenizer import byte_level_tokenizer

        PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


def load_reference(hf_dir: pathlib.Path):
    """transformers' own model from a saved directory, float32, eager attention."""
    import torch
    from transformers import MixtralForCausalLM

    if (hf_dir / "pytorch_model.bin").exists():
        from transformers import MixtralConfig

        model = MixtralForCausalLM(MixtralConfig.from_pretrained(hf_dir, attn_implementation="eager"))
        model.load_state_dict(torch.load(hf_dir / "pytorch_model.bin", weights_only=True))
    else:
        model = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.float().eval()
