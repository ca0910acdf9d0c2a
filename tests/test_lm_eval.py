"""lm-evaluation-harness (`--model local-completions`, loglikelihood requests with echo) against the server
scores the MMLU sample as jaxfire.evaluate does in-process: the same accuracy, and each answer's
log-likelihood equal to the in-process next-token log-probability of its letter."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import jaxfire
from jaxfire import evaluate
from jaxfire.server import CompletionServer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def test_lm_eval_local_completions_scores_as_evaluate_does(monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.chdir(ROOT)  # the task's data file is named from the repository's root
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = jaxfire.load(dtype="float32")
    engine = jaxfire.Engine(model, slots=4, max_len=128).start()  # the longest prompt has 90 tokens
    server = CompletionServer(engine, port=0, model_name="builtin")
    server.serve_in_thread()
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"http://127.0.0.1:{server.server_address[1]}/v1/completions",
                        "model": "builtin", "tokenizer_backend": "remote", "num_concurrent": 4, "max_retries": 1},
            tasks=["jaxfire_mmlu_sample"], task_manager=TaskManager(include_path=str(DATA / "lm_eval")),
            log_samples=True)
    finally:
        server.shutdown()
        server.server_close()
        engine.close()

    want = evaluate.evaluate_mmlu(model, DATA / "mmlu_sample", shots=0, batch=16)  # one batch, as below
    samples = out["samples"]["jaxfire_mmlu_sample"]
    assert len(samples) == want["questions"] == 15
    assert out["results"]["jaxfire_mmlu_sample"]["acc,none"] == pytest.approx(want["accuracy"])
    letters = evaluate.answer_token_ids(model.tokenizer)
    prompts = [model.tokenizer.encode(s["doc"]["prompt"], add_special_tokens=False) for s in samples]
    assert all(p[0] == model.config.bos_token_id and p[1] != p[0] for p in prompts)  # one BOS, as evaluate's
    logits = evaluate.last_logits(model, prompts)  # [15, V]
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    served = np.array([[ll for ll, _ in s["filtered_resps"]] for s in samples])  # [15, 4]
    np.testing.assert_allclose(served, lp[:, letters], rtol=1e-4, atol=1e-4)
