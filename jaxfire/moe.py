"""The sparse mixture-of-experts block: route, dispatch (sort by expert), grouped experts, combine.

On a device mesh the block is one `shard_map` (`expert_parallel`): tokens are split over the "data"
and "expert" axes, each device routes its own tokens, sends each token to the devices holding its
experts with one all_to_all over the "expert" axis, runs its local experts as one grouped matmul, and
a second all_to_all brings the results back to be combined. Buffers are sized for the worst case
(every assignment to one device), so no token is ever dropped whatever the routing skew. Over the
"tensor" axis each device holds a slice of every expert's width F and sees the same tokens; one psum
adds the slices' outputs (tensor parallelism: no all_to_all, each device reads 1/t of the weights).

Tokens a call does not need (`valid` False: inactive decode slots, prompt padding) are routed to no
expert: their assignments sort after every group, so the grouped matmul neither reads weights nor
computes for them, and their output is zero. A decode step over many slots with few of them running
then reads only the experts its running tokens chose.

Dimensions: T tokens, D model width, E experts (El per device), A = T * top_k token-expert
assignments, F expert width, N devices on the expert axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxfire import quant
from jaxfire import sharding as S
from jaxfire.params import DOWN_AXES, GATE_UP_AXES, MoE


def route(router: jax.Array, x: jax.Array, top_k: int,
          valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mixtral routing: logits in x's dtype (as Hugging Face's router linear returns them), softmax
    over all experts in float32, the top k (the lower id first on ties), weights renormalised to sum
    to one. Tokens with valid False get expert id E (past every expert) and weight zero. The router is
    never quantized.
    """
    # x: [T, D], router: [E, D], valid: [T] -> weights [T, k] float32, experts [T, k] int32
    logits = jnp.einsum("td,ed->te", x, router.astype(x.dtype), preferred_element_type=jnp.float32)  # [T, E]
    probs = jax.nn.softmax(logits.astype(x.dtype).astype(jnp.float32), axis=-1)  # [T, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k]
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if valid is not None:
        weights = jnp.where(valid[:, None], weights, 0.0)
        experts = jnp.where(valid[:, None], experts, router.shape[0])
    return weights, experts.astype(jnp.int32)


def experts_ffn(p: MoE, xs: jax.Array, group_sizes: jax.Array, policy: quant.Fp8Policy = quant.Fp8Policy(),
                implementation: str = "xla") -> jax.Array:
    """SwiGLU experts over rows sorted by expert (group_sizes rows each)."""
    # xs: [A, D] -> [A, D]
    # [E, 2, F, D] -> [E, 2F, D], gate rows then up rows (a free reshape; a QArray's scales alike)
    gate_up = jax.tree.map(lambda a: a.reshape(a.shape[0], -1, *a.shape[3:]), p.w_gate_up)
    h = quant.grouped_swiglu(xs, gate_up, group_sizes, policy, implementation)  # [A, F]
    return quant.grouped(h, p.w_down, group_sizes, policy, implementation)


# Up to this many assignments (a decode step of 256 tokens at top-2) `dispatch` ranks them by
# comparing all pairs: a few fused elementwise-and-sum kernels where a sort, a bincount's scatter and
# the inverse permutation's scatter are several launches each, which dominate a small step.
RANK_MAX_ASSIGNMENTS = 512
DISPATCH_METHODS = ("auto", "sort", "rank")


def dispatch(experts: jax.Array, num_experts: int, method: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Orders the A assignments by expert (stably); returns that order, each assignment's row in it
    (the inverse permutation), and the rows per expert. Ids past the last expert (tokens routed
    nowhere) sort last and are in no group.

    method: "sort" (argsort and scatters), "rank" (all-pairs comparisons, for small A), or "auto"
    (rank up to RANK_MAX_ASSIGNMENTS assignments, sort above).
    """
    # experts: [T, k] -> order [A], position [A], group_sizes [E]
    if method not in DISPATCH_METHODS:
        raise ValueError(f"MoE dispatch method must be one of {DISPATCH_METHODS}, got {method!r}")
    flat = experts.reshape(-1)  # [A]
    a = flat.shape[0]
    index = jnp.arange(a, dtype=jnp.int32)
    if method == "rank" or (method == "auto" and a <= RANK_MAX_ASSIGNMENTS):
        # j sorts before i: a smaller expert id, or the same id earlier (stable)
        mine, other = flat[:, None], flat[None, :]  # [A, 1], [1, A]
        before = (other < mine) | ((other == mine) & (index[None, :] < index[:, None]))  # [A, A]
        position = jnp.sum(before, axis=1, dtype=jnp.int32)  # [A]
        order = jnp.sum(jnp.where(position[None, :] == index[:, None], index[None, :], 0), axis=1)  # [A]
        group_sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts)[None, :], axis=0, dtype=jnp.int32)  # [E]
        return order, position, group_sizes
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    position = jnp.zeros_like(order).at[order].set(index)
    return order, position, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def moe_block(p: MoE, x: jax.Array, top_k: int, policy: quant.Fp8Policy = quant.Fp8Policy(),
              implementation: str = "xla", mesh: Mesh | None = None, valid: jax.Array | None = None,
              dispatch_method: str = "auto") -> jax.Array:
    """valid: [T] bool, the tokens whose output is needed (None: all); the others' output is zero.
    dispatch_method: how assignments are ordered by expert (`dispatch`)."""
    # x: [T, D] -> [T, D]
    if dispatch_method not in DISPATCH_METHODS:
        raise ValueError(f"MoE dispatch method must be one of {DISPATCH_METHODS}, got {dispatch_method!r}")
    if mesh is not None and mesh.size > 1:
        return expert_parallel(p, x, top_k, policy, implementation, mesh, valid, dispatch_method)
    return _local_moe(p, x, top_k, policy, implementation, valid, dispatch_method)


def _local_moe(p: MoE, x: jax.Array, top_k: int, policy: quant.Fp8Policy, implementation: str,
               valid: jax.Array | None, dispatch_method: str = "auto") -> jax.Array:
    num_experts = p.router.shape[0]
    with jax.named_scope("route"):
        weights, experts = route(p.router, x, top_k, valid)  # [T, k]
    with jax.named_scope("dispatch"):
        order, position, group_sizes = dispatch(experts, num_experts, dispatch_method)
        xs = x[order // top_k]  # [A, D]
    with jax.named_scope("experts"):
        ys = experts_ffn(p, xs, group_sizes, policy, implementation)  # [A, D]
    with jax.named_scope("combine"):
        return combine(ys, position, weights, x.dtype)


def combine(ys: jax.Array, position: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Sums each token's expert outputs, given sorted by expert (assignment i at row position[i]), with
    its routing weights."""
    # ys: [A, D], position: [A], weights: [T, k] -> [T, D]
    t, k = weights.shape
    # A gather through the inverse permutation: XLA runs row gathers faster than row scatters.
    y = ys[position].reshape(t, k, -1)  # [T, k, D]
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(dtype)


def _moe_specs(p: MoE, mesh: Mesh) -> MoE:
    """shard_map specs of the MoE weights, by the rules table (the router is replicated)."""

    def place(w, axes):  # an array, or a QArray whose scales drop the contracted axis
        if isinstance(w, quant.QArray):
            return quant.QArray(value=S.partition_spec(mesh, axes, w.value.shape),
                                scale=S.partition_spec(mesh, axes[:-1], w.scale.shape))
        return S.partition_spec(mesh, axes, w.shape)

    return MoE(router=PartitionSpec(), w_gate_up=place(p.w_gate_up, GATE_UP_AXES), w_down=place(p.w_down, DOWN_AXES))


def expert_parallel(p: MoE, x: jax.Array, top_k: int, policy: quant.Fp8Policy, implementation: str,
                    mesh: Mesh, valid: jax.Array | None = None, dispatch_method: str = "auto") -> jax.Array:
    """The MoE block over a mesh: tokens and experts split over "expert" (two all_to_alls), expert
    widths over "tensor" (a psum)."""
    # x: [T, D], valid: [T] -> [T, D]
    shards = S.token_shards(mesh)
    t = x.shape[0]
    padded = -(-t // shards) * shards
    valid = jnp.ones((t,), bool) if valid is None else valid
    if padded != t:  # padding rows are routed nowhere and discarded
        x = jnp.pad(x, ((0, padded - t), (0, 0)))
        valid = jnp.pad(valid, (0, padded - t))
    tokens = PartitionSpec(S.RULES["tokens"])
    specs = _moe_specs(p, mesh)
    # F that the tensor axis does not divide stays whole on every device, which then all compute the
    # same output: nothing to add up.
    sliced = mesh.shape["tensor"] > 1 and _split_last(specs.w_down)

    def local(p_, x_, v_):
        if mesh.shape["expert"] == 1:
            y = _local_moe(p_, x_, top_k, policy, implementation, v_, dispatch_method)
        else:
            y = _expert_parallel_local(p_, x_, v_, top_k, policy, implementation, mesh.shape["expert"],
                                       dispatch_method)
        if sliced:
            with jax.named_scope("tensor_sum"):
                y = jax.lax.psum(y, "tensor")
        return y

    fn = jax.shard_map(local, mesh=mesh, in_specs=(specs, tokens, tokens), out_specs=tokens,
                       check_vma=False)  # kernels inside
    return fn(p, x, valid)[:t]


def _split_last(spec) -> bool:
    spec = spec.value if isinstance(spec, quant.QArray) else spec
    return len(spec) == 3 and spec[2] is not None


def _expert_parallel_local(p: MoE, x: jax.Array, valid: jax.Array, top_k: int, policy: quant.Fp8Policy,
                           implementation: str, n: int, dispatch_method: str = "auto") -> jax.Array:
    """One device's part: its tokens [Tl, D] in, their MoE outputs out; p holds its El experts."""
    local_experts = p.w_down.shape[0]
    with jax.named_scope("route"):
        weights, experts = route(p.router, x, top_k, valid)  # [Tl, k]
    with jax.named_scope("dispatch"):
        flat = experts.reshape(-1)  # [A]
        a = flat.shape[0]
        order, position, _ = dispatch(experts, local_experts * n, dispatch_method)  # by expert, so by device
        dest = flat[order] // local_experts  # [A]; N for a token routed nowhere: never sent
        counts = jnp.bincount(dest, length=n)
        slot = jnp.arange(a) - (jnp.cumsum(counts) - counts)[jnp.minimum(dest, n - 1)]  # within its block
        # Each row travels with its local expert id in one more column (small integers are exact in
        # any float dtype), so one all_to_all carries both; `local_experts` marks an empty row.
        d = x.shape[1]
        exact = 2 ** (jnp.finfo(x.dtype).nmant + 1)
        if local_experts > exact:
            raise ValueError(f"{local_experts} experts per device: expert parallelism sends expert ids as {x.dtype}, "
                             f"which holds integers exactly only up to {exact}; use a longer expert axis")
        ids = (flat[order] % local_experts).astype(x.dtype)[:, None]  # [A, 1]
        send = jnp.zeros((n, a, d + 1), x.dtype).at[:, :, d].set(local_experts)
        send = send.at[dest, slot].set(jnp.concatenate([x[order // top_k], ids], axis=1), mode="drop")
        recv = jax.lax.all_to_all(send, "expert", 0, 0)  # [N, A, D+1]: row blocks from each source device
        recv_ids = recv[:, :, d].reshape(-1).astype(jnp.int32)  # [N*A]
    with jax.named_scope("experts"):
        rows = recv[:, :, :d].reshape(n * a, d)
        # empty rows sort last, past every group
        local_order, local_position, group_sizes = dispatch(recv_ids, local_experts, dispatch_method)
        ys = experts_ffn(p, rows[local_order], group_sizes, policy, implementation)
        back = ys[local_position].reshape(n, a, -1)
    with jax.named_scope("combine"):
        returned = jax.lax.all_to_all(back, "expert", 0, 0)  # [N, A, D]
        results = returned.at[dest, slot].get(mode="fill", fill_value=0)  # [A, D] in `order`
        return combine(results, position, weights, x.dtype)
