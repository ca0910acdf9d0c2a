"""Log-probabilities of a prompt's own tokens (completions' `echo`), from the model's full forward pass.

The engine samples new tokens only; scoring a prompt (lm-evaluation-harness's loglikelihood requests)
needs each prompt token's log-probability given the ones before it, which one forward pass over the
whole prompt gives. Prompts go through in padded batches of at most `max_batch_tokens` positions.

Dimensions: B prompts, T positions, V vocab, N alternatives.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfire import api


@functools.partial(jax.jit, static_argnames=("top",))
def _token_scores(logits: jax.Array, tokens: jax.Array, top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    # logits [B, T, V], tokens [B, T] -> chosen [B, T-1], values [B, T-1, N], ids [B, T-1, N]
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]: predicting 1..T-1
    chosen = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    values, ids = jax.lax.top_k(lp, top)
    return chosen, values, ids


def _pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())  # few compiled shapes


def prompt_logprobs(model: api.Model, prompts: Sequence[Sequence[int]], top: int = 0,
                    max_batch_tokens: int = 4096) -> list[tuple[list[float], list[tuple[tuple[int, float], ...]]]]:
    """Per prompt, the log-probability of each token after the first given those before it, and (top > 0)
    the `top` likeliest ids at each of those positions, most likely first."""
    out: dict[int, tuple[list[float], list]] = {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    s = 0
    while s < len(order):
        t = _pow2(len(prompts[order[s]]), 16)
        rows = 1
        # Grow the batch while its padded [rows, T] stays within the budget.
        while s + rows < len(order):
            t_next = _pow2(len(prompts[order[s + rows]]), 16)
            if _pow2(rows + 1, 1) * t_next > max_batch_tokens:
                break
            rows, t = rows + 1, t_next
        chunk = order[s:s + rows]
        tokens = np.full((_pow2(rows, 1), t), model.config.pad_token_id, np.int32)
        for r, i in enumerate(chunk):
            tokens[r, :len(prompts[i])] = prompts[i]
        chosen, values, ids = _token_scores(api.logits(model, tokens), jnp.asarray(tokens), max(top, 1))
        chosen, values, ids = np.asarray(chosen), np.asarray(values), np.asarray(ids)
        for r, i in enumerate(chunk):
            n = len(prompts[i]) - 1
            alternatives = [tuple(zip(map(int, ids[r, p, :top]), map(float, values[r, p, :top]))) for p in range(n)]
            out[i] = ([float(v) for v in chosen[r, :n]], alternatives if top else [])
        s += rows
    return [out[i] for i in range(len(prompts))]
