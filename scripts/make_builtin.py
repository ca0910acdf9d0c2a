"""Writes an untrained built-in model: the tiny preset with seeded random weights and a byte-level
tokenizer. `scripts/train_demo.py` replaces it with trained weights.

    python scripts/make_builtin.py [--out jaxfire/builtin]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp

from jaxfire import checkpoint
from jaxfire.api import BUILTIN_DIR
from jaxfire.config import Config
from jaxfire.params import init_params
from jaxfire.tokenizer import byte_level_tokenizer

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(BUILTIN_DIR))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = Config.preset("tiny").replace(vocab_size=320, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    params = init_params(config, jax.random.key(args.seed), jnp.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        byte_level_tokenizer().save(str(pathlib.Path(tmp) / "tokenizer.json"))
        out = checkpoint.save(args.out, params, config, tokenizer_dir=tmp, overwrite=True,
                              extra={"source": "random (untrained)"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
