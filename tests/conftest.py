"""Test set-up: CPU with 8 fake devices (for meshes), and tiny random Hugging Face Mixtral models."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """Saves (once per session) the named tiny random Hugging Face model and returns its directory."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = hf_models.save(name, tmp_path_factory.mktemp(f"hf-{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def converted(hf_model_dir, tmp_path_factory):
    """Converts (once per session) the named tiny HF model; returns (hf_dir, jaxfire_dir)."""
    from convert import convert_hf

    cache = {}

    def get(name: str):
        if name not in cache:
            hf_dir = hf_model_dir(name)
            out = tmp_path_factory.mktemp(f"jf-{name}") / "ckpt"
            convert_hf(hf_dir, out, progress=False)
            cache[name] = (hf_dir, out)
        return cache[name]

    return get


@pytest.fixture(scope="session", autouse=True)
def _compile_cache_in_tmp(tmp_path_factory):
    """The command lines the tests start keep their compilation cache in the session's temporary directory,
    not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFIRE_CACHE_DIR", str(tmp_path_factory.mktemp("xla-cache")))
        yield


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Each test module's compiled programs are let go after it: a worker runs hundreds of tests, and in
    full runs XLA crashed (a segfault while compiling a mesh program, late in the run, in a test that
    passes alone) once the workers had piled up every program compiled before."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
