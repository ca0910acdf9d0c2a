"""The converter and checkpoints: layouts, dtypes, and every error a user's input can cause."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxfire
from convert import CheckpointReadError, ConversionError, convert_hf
from convert.readers import SafetensorsFile
from jaxfire import checkpoint
from jaxfire.config import Config, ConfigError


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_safetensors(path, edit):
    """Rewrites a safetensors file after edit(dict name -> array) (tensors may be dropped or replaced)."""
    from safetensors.numpy import save_file

    f = SafetensorsFile(path)
    tensors = {n: np.ascontiguousarray(f.load(n)) for n in f.names()}
    edit(tensors)
    save_file(tensors, str(path))


def test_bf16_source_keeps_its_precision_unless_told(converted, tmp_path):
    hf_dir, ckpt = converted("sharded_bf16")
    assert checkpoint.read_metadata(ckpt)["dtypes"] == ["bfloat16"]
    assert jaxfire.load(ckpt).params.layers[0].moe.w_gate_up.dtype == "bfloat16"
    out = convert_hf(hf_dir, tmp_path / "f32", dtype="float32", progress=False)
    assert checkpoint.read_metadata(out)["dtypes"] == ["float32"]


def test_fused_and_per_expert_layouts_give_the_same_weights(hf_model_dir, tmp_path):
    """The same model saved per expert (safetensors) and fused (.bin) converts to identical params."""
    import torch

    from tests import hf_models

    src = hf_model_dir("gqa")
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(src / "config.json", fused)
    torch.save(hf_models.build("gqa").state_dict(), fused / "pytorch_model.bin")
    a = jaxfire.load(convert_hf(src, tmp_path / "a", progress=False)).params
    b = jaxfire.load(convert_hf(fused, tmp_path / "b", progress=False)).params
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_missing_expert_tensor_is_named(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("gqa"), tmp_path / "m")
    rewrite_safetensors(d / "model.safetensors",
                        lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"):
        convert_hf(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_missing_attention_tensor_is_named(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("gqa"), tmp_path / "m")
    rewrite_safetensors(d / "model.safetensors", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ConversionError, match=r"layer 0: attn\.wk"):
        convert_hf(d, tmp_path / "out", progress=False)


def test_misshaped_tensor_is_named(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("gqa"), tmp_path / "m")

    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:, :-1].copy()

    rewrite_safetensors(d / "model.safetensors", shrink)
    with pytest.raises(ConversionError, match=r"q_proj\.weight has shape \(32, 31\), expected \(32, 32\)"):
        convert_hf(d, tmp_path / "out", progress=False)


def test_unexpected_tensor_is_named(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("gqa"), tmp_path / "m")
    rewrite_safetensors(d / "model.safetensors", lambda t: t.update({"vision.proj": np.ones(3, np.float32)}))
    with pytest.raises(ConversionError, match=r"unexpected tensor vision\.proj"):
        convert_hf(d, tmp_path / "out", progress=False)


def test_unreadable_file_is_named(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("gqa"), tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors"):
        convert_hf(d, tmp_path / "out", progress=False)


def test_truncated_tensor_data_is_detected(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("gqa"), tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointReadError, match="truncated"):
        convert_hf(d, tmp_path / "out", progress=False)


def test_missing_shard_is_named(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("sharded_bf16"), tmp_path / "m")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointReadError, match="model-00002-of-00003.safetensors"):
        convert_hf(d, tmp_path / "out", progress=False)


def test_non_mixtral_config_is_refused(hf_model_dir, tmp_path):
    d = copy_model(hf_model_dir("gqa"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not a Mixtral config"):
        convert_hf(d, tmp_path / "out", progress=False)


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts_per_tok": 9}, "exceeds num_experts"),
])
def test_configs_that_cannot_be_served_are_refused(change, message):
    base = {"model_type": "mixtral", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 4}
    with pytest.raises(ConfigError, match=message):
        Config.from_hf({**base, **change})


def test_config_reads_both_rope_theta_keys():
    base = {"model_type": "mixtral", "hidden_size": 32, "num_attention_heads": 4}
    assert Config.from_hf({**base, "rope_theta": 1234.0}).rope_theta == 1234.0
    assert Config.from_hf({**base, "rope_parameters": {"rope_theta": 99.0}}).rope_theta == 99.0
    assert Config.from_hf({**base, "head_dim": 24}).head_dim == 24
    assert Config.from_hf({**base, "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)
    assert hash(Config.preset("mixtral-8x7b")) == hash(Config.preset("mixtral-8x7b"))
    assert Config.preset("mixtral-8x7b").param_count() == pytest.approx(46.7e9, rel=0.01)


def test_bin_without_torch_gives_a_clear_error(hf_model_dir, tmp_path, monkeypatch):
    from convert.readers import TorchFile

    path = hf_model_dir("mha_top3_bin") / "pytorch_model.bin"
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointReadError, match="needs torch"):
        TorchFile(path)


def test_pickles_are_loaded_without_running_code(tmp_path):
    """A .bin whose pickle would execute code is refused (weights_only)."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"x": Exploit()}))
    from convert.readers import TorchFile

    with pytest.raises(CheckpointReadError, match="cannot read PyTorch checkpoint"):
        TorchFile(path)


def test_missing_tokenizer_warns(hf_model_dir, tmp_path):
    with pytest.warns(UserWarning, match="no tokenizer files"):
        out = convert_hf(hf_model_dir("gqa"), tmp_path / "out", progress=False)
    assert jaxfire.load(out).tokenizer is None


def test_interrupted_conversion_leaves_nothing_that_looks_complete(hf_model_dir, tmp_path, monkeypatch):
    calls = []

    def fail_second_layer(self, i, layer):
        calls.append(i)
        if i == 1:
            raise KeyboardInterrupt
        return original(self, i, layer)

    original = checkpoint.CheckpointWriter.write_layer
    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_layer", fail_second_layer)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(hf_model_dir("gqa"), tmp_path / "out", progress=False)
    assert calls == [0, 1]
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unless_asked(converted, tmp_path):
    hf_dir, _ = converted("gqa")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(checkpoint.CheckpointError, match="not empty"):
        convert_hf(hf_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    convert_hf(hf_dir, out, overwrite=True, progress=False)
    assert (out / checkpoint.FORMAT_FILE).exists() and not (out / "keep.txt").exists()


def test_cli_converts_and_reports_errors_in_one_line(hf_model_dir, tmp_path):
    hf_dir = hf_model_dir("gqa")
    ok = subprocess.run([sys.executable, "-m", "convert", str(hf_dir), str(tmp_path / "o"), "--quiet"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o" / checkpoint.FORMAT_FILE).exists()
    bad = subprocess.run([sys.executable, "-m", "convert", str(tmp_path / "nowhere"), str(tmp_path / "p")],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    assert "nowhere" in bad.stderr
