"""jaxfire against Hugging Face transformers' Mixtral: float32 logits and greedy tokens."""

import zlib

import numpy as np
import pytest
import torch

import jaxfire
from tests import hf_models

MODELS = list(hf_models.MODELS)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(converted, name):
    hf_dir, ckpt = converted(name)
    model = jaxfire.load(ckpt, dtype="float32")
    ref_model = hf_models.load_reference(hf_dir)
    tokens = np.random.default_rng(zlib.crc32(name.encode())).integers(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    out = jaxfire.logits(model, tokens)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert rel_err(out, ref) < 1e-4


def hf_greedy(ref_model, prompt, max_new_tokens, eos):
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos)] if eos in new else new


@pytest.mark.parametrize("name", ["gqa", "mqa_window_tied", "mha_top3_bin"])
def test_greedy_batch_of_different_lengths_matches_generate(converted, name):
    hf_dir, ckpt = converted(name)
    model = jaxfire.load(ckpt, dtype="float32")
    ref_model = hf_models.load_reference(hf_dir)
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    # Token ids 3.. avoid the special ids, so no prompt contains EOS.
    prompts = [rng.integers(3, vocab, n).tolist() for n in (5, 13, 9)]
    eos = model.config.eos_token_ids[0]
    result = jaxfire.generate(model, prompts, max_new_tokens=24)
    for prompt, got in zip(prompts, result.tokens):
        assert got == hf_greedy(ref_model, prompt, 24, eos)
    assert any(len(t) >= 20 for t in result.tokens)


def test_top3_override_matches_transformers_top3(converted):
    """num_experts_per_tok overridden at load time equals a transformers model configured with top-3."""
    hf_dir, ckpt = converted("gqa")
    model = jaxfire.load(ckpt, dtype="float32", num_experts_per_tok=3)
    assert model.config.num_experts_per_tok == 3
    ref_model = hf_models.load_reference(hf_dir)
    for layer in ref_model.model.layers:
        layer.mlp.gate.top_k = 3
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    assert rel_err(jaxfire.logits(model, tokens), ref) < 1e-4
    top2 = jaxfire.logits(jaxfire.load(ckpt, dtype="float32"), tokens)
    assert rel_err(top2, ref) > 1e-3  # the override changed the computation


def test_text_prompts_through_the_tokenizer(converted):
    hf_dir, ckpt = converted("mqa_window_tied")
    model = jaxfire.load(ckpt, dtype="float32")
    assert model.tokenizer is not None
    ids = model.tokenizer.encode("def f(x):")
    result = jaxfire.generate(model, ["def f(x):", "print("], max_new_tokens=8)
    assert result.prompt_tokens[0] == ids
    assert result.texts == [model.tokenizer.decode(t) for t in result.tokens]
    ref_model = hf_models.load_reference(hf_dir)
    assert result.tokens[0] == hf_greedy(ref_model, ids, 8, model.config.eos_token_ids[0])


def test_chat_prompts_through_the_converted_template(converted):
    """The converter carries the chat template (transformers writes it as chat_template.jinja): chat
    messages become the prompt ids transformers makes of them, and generate as transformers does."""
    from transformers import AutoTokenizer

    hf_dir, ckpt = converted("mqa_window_tied")
    assert (ckpt / "chat_template.jinja").is_file()
    model = jaxfire.load(ckpt, dtype="float32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]
    want = AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(messages, add_generation_prompt=True)
    ids = model.tokenizer.encode_chat(messages)
    assert ids == list(want["input_ids"]) and ids[0] == model.config.bos_token_id and ids[1] != ids[0]
    got = jaxfire.generate(model, [ids], max_new_tokens=6).tokens[0]
    assert got == hf_greedy(hf_models.load_reference(hf_dir), ids, 6, model.config.eos_token_ids[0])


def test_greedy_through_the_decode_attention_kernel_matches_generate(converted):
    """The Pallas decode attention kernel (interpret mode on CPU) in the model's decode step."""
    hf_dir, ckpt = converted("mqa_window_tied")
    model = jaxfire.load(ckpt, dtype="float32").with_runtime(decode_attention="pallas")
    ref_model = hf_models.load_reference(hf_dir)
    prompt = np.random.default_rng(3).integers(3, model.config.vocab_size, 7).tolist()
    got = jaxfire.generate(model, [prompt], max_new_tokens=20).tokens[0]
    assert got == hf_greedy(ref_model, prompt, 20, model.config.eos_token_ids[0])
