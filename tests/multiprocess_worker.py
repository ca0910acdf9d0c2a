"""One process of the multi-process test: 4 CPU devices, joined to the others by jax.distributed."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, num_processes: int, port: str, ckpt: str, out: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    import jaxfire

    assert jax.device_count() == 4 * num_processes and jax.local_device_count() == 4
    mesh = jaxfire.make_mesh(expert=4, tensor=2)  # spans both processes
    model = jaxfire.load(ckpt, dtype="float32", mesh=mesh)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 13))
    logits = multihost_utils.process_allgather(jaxfire.logits(model, tokens), tiled=True)
    np.save(out, np.asarray(logits))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
