"""The same sharded model run by two processes (jax.distributed, 4 CPU devices each) equals one device."""

import pathlib
import socket
import subprocess
import sys

import numpy as np

import jaxfire

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(converted, tmp_path):
    _, ckpt = converted("ep8")
    port = free_port()
    root = pathlib.Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(ckpt),
                               str(tmp_path / f"out{i}.npy")], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    single = jaxfire.load(ckpt, dtype="float32")
    tokens = np.random.default_rng(0).integers(0, single.config.vocab_size, (4, 13))
    expected = np.asarray(jaxfire.logits(single, tokens))
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"out{i}.npy"), expected, rtol=1e-5, atol=1e-5)
