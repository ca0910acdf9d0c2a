"""The sampling programs every engine step ends with: each row drawn from its request's own stream, with
its log-probability and, when asked, the likeliest alternatives, brought to the host in one transfer.
A request's sampling penalties (`penalize`, over its token counts `count` keeps on the device) and then
its logit bias (`add_bias`) change its row before, so the tokens and log-probabilities are those of
the changed distribution.

Dimensions: B rows, V vocab, L bias entries per row (`MAX_LOGIT_BIAS`), N ids (`reset_counts`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxfire import sampling


def apply_bias(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """Adds values[b, l] to logits[b, ids[b, l]]; padding entries are (any id, 0.0), which change nothing."""
    # logits: [B, V] float32, ids: [B, L] int32, values: [B, L] float32 -> [B, V]
    rows = jnp.arange(logits.shape[0])[:, None]  # [B, 1]
    return logits.at[rows, ids].add(values.astype(logits.dtype))


@jax.jit
def add_bias(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """`apply_bias` as a program of its own, which the host runs before a step's sampling program only
    when a row of the step has a bias: steps without one run as they would without the feature, and
    the sampling programs compile no variant for it. ids and values may hold more rows than the logits
    (a slot state's), of which the first B are the logits' rows."""
    # logits: [B, V] float32, ids: [>= B, L] int32, values: [>= B, L] float32 -> [B, V]
    b = logits.shape[0]
    return apply_bias(logits, ids[:b], values[:b])


def apply_penalties(logits: jax.Array, counts: jax.Array, in_prompt: jax.Array, presence: jax.Array,
                    frequency: jax.Array, repetition: jax.Array) -> jax.Array:
    """vLLM's (and OpenAI's) sampling penalties. A token the row has seen (generated, or in its prompt)
    has a positive logit divided by `repetition`, a negative one multiplied by it; then each generated
    token's logit loses `frequency` times its count and `presence` once. Neutral values (0, 0, 1) change
    nothing."""
    # logits: [B, V] float32, counts: [B, V] int32, in_prompt: [B, V] bool, the rest [B] float32 -> [B, V]
    generated = counts > 0  # [B, V]
    rep = repetition[:, None]  # [B, 1]
    logits = jnp.where(generated | in_prompt, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * generated


@jax.jit
def penalize(logits: jax.Array, counts: jax.Array, in_prompt: jax.Array, presence: jax.Array, frequency: jax.Array,
             repetition: jax.Array) -> jax.Array:
    """`apply_penalties` as a program of its own, run only for a step with a penalized row (as `add_bias`
    is); counts and in_prompt may hold more rows than the logits (the engine's rows)."""
    b = logits.shape[0]
    return apply_penalties(logits, counts[:b], in_prompt[:b], presence, frequency, repetition)


@functools.partial(jax.jit, donate_argnames=("counts",))
def count(counts: jax.Array, tokens: jax.Array, rows: jax.Array) -> jax.Array:
    """Adds each of `rows`' sampled token to its counts (the device's own tokens: the host need not have
    read them)."""
    # counts: [B, V] int32, tokens: [B] int32, rows: [B] bool -> [B, V]
    return counts.at[jnp.arange(counts.shape[0]), tokens].add(rows.astype(counts.dtype))


@functools.partial(jax.jit, donate_argnames=("counts", "in_prompt"))
def reset_counts(counts: jax.Array, in_prompt: jax.Array, row: jax.Array, generated: jax.Array,
                 prompt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row `row` starts over for a request: its counts of the `generated` ids, and the ids of its `prompt`
    (both padded with ids past the vocabulary, which count nothing)."""
    # counts: [B, V] int32, in_prompt: [B, V] bool, generated and prompt: [N] int32
    v = counts.shape[1]
    ones = jnp.ones(generated.shape, counts.dtype)
    counts = counts.at[row].set(jnp.zeros((v,), counts.dtype).at[generated].add(ones, mode="drop"))
    in_prompt = in_prompt.at[row].set(jnp.zeros((v,), bool).at[prompt].set(True, mode="drop"))
    return counts, in_prompt


def with_logprobs(logits: jax.Array, tokens: jax.Array, top: int = 0) -> jax.Array:
    """[2 + 2 top, B] int32: the tokens, their log-probabilities under the logits as float32 bits, and
    with `top` the `top` most likely ids and their log-probabilities (bits), so one transfer brings
    all to the host (`read`)."""
    # logits: [B, V] float32, tokens: [B] int32
    lsm = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
    lp = jnp.take_along_axis(lsm, tokens[:, None], axis=-1)[:, 0]  # [B]
    rows = [tokens[None], jax.lax.bitcast_convert_type(lp, jnp.int32)[None]]
    if top:
        best, ids = jax.lax.top_k(lsm, top)  # [B, top] each, most likely first
        rows += [ids.T.astype(jnp.int32), jax.lax.bitcast_convert_type(best, jnp.int32).T]
    return jnp.concatenate(rows)


def read(out: jax.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Tokens [B], log-probabilities [B], and the top ids and their log-probabilities ([B, top] each, or
    None) from a sampling program's [2 + 2 top, B] output."""
    host = np.asarray(out)
    top = (host.shape[0] - 2) // 2
    if not top:
        return host[0], host[1].view(np.float32), None, None
    return host[0], host[1].view(np.float32), host[2:2 + top].T, host[2 + top:].T.view(np.float32)


def sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array,
            top_p: jax.Array, top_k: jax.Array, sample: bool) -> jax.Array:
    """Samples each row from its own stream: key fold_in(key(seeds[b]), steps[b]); argmax at temperature 0.

    `sample` is static, decided by the host (does any row have a temperature above 0?): an all-greedy
    batch skips the per-row vocabulary sort without a device-side condition, whose predicate XLA would
    read back to the host in the middle of the step.
    """
    # logits: [B, V] float32 -> [B] int32
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
    one = lambda row, key, t, p, k: sampling.sample(row[None], key, t, p, k)[0]  # noqa: E731
    return jax.vmap(one)(logits, keys, temperature, top_p, top_k)

