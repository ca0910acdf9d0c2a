"""The sparse mixture-of-experts block: route, dispatch (sort by expert), grouped experts, combine.

On a device mesh the block is one `shard_map` (`expert_parallel`): tokens are split over the "data"
and "expert" axes, each device routes its own tokens, sends each token to the devices holding its
experts with one all_to_all over the "expert" axis, runs its local experts as one grouped matmul, and
a second all_to_all brings the results back to be combined. Buffers are sized for the worst case
(every assignment to one device), so no token is ever dropped whatever the routing skew. Over the
"tensor" axis each device holds a slice of every expert's width F and sees the same tokens; one psum
adds the slices' outputs (tensor parallelism: no all_to_all, each device reads 1/t of the weights).

One token's assignments (a batch-1 decode step on the Pallas kernels) skip the ordering: the
kernels take the token with its k expert ids and write the k rows in routing order, so the step runs
no ranking, gathers or row tables before and after the experts.

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
from pallas_kernels.moe_route import moe_route


ROUTE_IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_triton")


def route(router: jax.Array, x: jax.Array, top_k: int, valid: jax.Array | None = None,
          implementation: str = "xla") -> tuple[jax.Array, jax.Array]:
    """Mixtral routing: softmax over all experts in float32, top-k, weights renormalised to sum to one.

    Tokens with valid False get expert id E (past every expert) and weight zero. implementation:
    "xla" (`pallas_kernels.moe_route`'s jnp reference), "auto" (its one kernel on GPUs for bf16 / f16
    activations, where XLA runs a matmul, a softmax and a top-k kernel; XLA elsewhere), or an
    `implementation=` of `pallas_kernels.moe_route` ("pallas" runs in interpret mode off the GPU).
    The router is never quantized.
    """
    # x: [T, D], valid: [T] -> weights [T, k] float32, experts [T, k] int32
    if implementation not in ROUTE_IMPLEMENTATIONS:
        raise ValueError(f"MoE route implementation must be one of {ROUTE_IMPLEMENTATIONS}, got {implementation!r}")
    on_gpu = jax.default_backend() == "gpu" and x.dtype in (jnp.bfloat16, jnp.float16)
    if implementation == "xla" or (implementation == "auto" and not on_gpu):
        implementation = "reference"
    return moe_route(x, router, top_k, valid, implementation=None if implementation == "auto" else implementation)


def experts_ffn(p: MoE, xs: jax.Array, group_sizes: jax.Array | None, policy: quant.Fp8Policy = quant.Fp8Policy(),
                implementation: str = "xla", group_ids: jax.Array | None = None) -> jax.Array:
    """SwiGLU experts over rows sorted by expert (group_sizes), or over tokens as routed (group_ids
    [T, k]: each token's experts, xs [T, D]; output row t*k + j is token t through its j-th expert)."""
    # xs: [A, D] (or [T, D] with group_ids) -> [A, D]
    # [E, 2, F, D] -> [E, 2F, D], gate rows then up rows (a free reshape; a QArray's scales alike)
    gate_up = jax.tree.map(lambda a: a.reshape(a.shape[0], -1, *a.shape[3:]), p.w_gate_up)
    h = quant.grouped_swiglu(xs, gate_up, group_sizes, policy, implementation, group_ids)  # [A, F]
    row_ids = None if group_ids is None else group_ids.reshape(-1)  # [A]
    return quant.grouped(h, p.w_down, group_sizes, policy, implementation, row_ids)


# Up to this many assignments (a decode step of 256 tokens at top-2) `dispatch` ranks them by
# comparing all pairs: a few fused elementwise-and-sum kernels where a sort, a bincount's scatter and
# the inverse permutation's scatter are several launches each, which dominate a small step.
RANK_MAX_ASSIGNMENTS = 512
# With dispatch "unsorted", up to this many assignments (one token at top-k <= 3) go to the Pallas
# kernels as routed, each row with its expert id: no ordering, no gathers, no row tables; one token
# names each expert at most once, so no weights are read twice. Not yet timed on a GPU, so "auto"
# does not take it.
UNSORTED_MAX_ASSIGNMENTS = 3
DISPATCH_METHODS = ("auto", "sort", "rank")
MOE_DISPATCH_METHODS = DISPATCH_METHODS + ("unsorted",)


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
              dispatch_method: str = "auto", route_implementation: str = "xla") -> jax.Array:
    """valid: [T] bool, the tokens whose output is needed (None: all); the others' output is zero.
    dispatch_method: how assignments are ordered by expert (`dispatch`), or "unsorted": for steps of
    up to UNSORTED_MAX_ASSIGNMENTS assignments not at all, each row going to the kernels with its
    expert id (the grouped matmul's Triton kernel only), "auto" for larger steps.
    route_implementation: see `route`."""
    # x: [T, D] -> [T, D]
    if dispatch_method not in MOE_DISPATCH_METHODS:
        raise ValueError(f"MoE dispatch method must be one of {MOE_DISPATCH_METHODS}, got {dispatch_method!r}")
    if dispatch_method == "unsorted" and not quant.kernel_takes_group_ids(x, implementation):
        raise ValueError(f"moe_dispatch='unsorted' needs the grouped matmul's Triton kernel, which grouped_matmul="
                         f"{implementation!r} does not run here")
    if mesh is not None and mesh.size > 1:
        return expert_parallel(p, x, top_k, policy, implementation, mesh, valid, dispatch_method, route_implementation)
    return _local_moe(p, x, top_k, policy, implementation, valid, dispatch_method, route_implementation)


def _local_moe(p: MoE, x: jax.Array, top_k: int, policy: quant.Fp8Policy, implementation: str,
               valid: jax.Array | None, dispatch_method: str = "auto", route_implementation: str = "xla") -> jax.Array:
    num_experts = p.router.shape[0]
    with jax.named_scope("route"):
        weights, experts = route(p.router, x, top_k, valid, route_implementation)  # [T, k]
    a = experts.size
    if dispatch_method == "unsorted" and a <= UNSORTED_MAX_ASSIGNMENTS:
        with jax.named_scope("experts"):
            ys = experts_ffn(p, x, None, policy, implementation, group_ids=experts)  # [A, D], row t*k + j
        with jax.named_scope("combine"):
            return combine(ys, None, weights, x.dtype)
    with jax.named_scope("dispatch"):
        order, position, group_sizes = dispatch(experts, num_experts,
                                                "auto" if dispatch_method == "unsorted" else dispatch_method)
        xs = x[order // top_k]  # [A, D]
    with jax.named_scope("experts"):
        ys = experts_ffn(p, xs, group_sizes, policy, implementation)  # [A, D]
    with jax.named_scope("combine"):
        return combine(ys, position, weights, x.dtype)


def combine(ys: jax.Array, position: jax.Array | None, weights: jax.Array, dtype) -> jax.Array:
    """Sums each token's expert outputs, given sorted by expert (assignment i at row position[i]), or
    in assignment order (position None), with its routing weights."""
    # ys: [A, D], position: [A], weights: [T, k] -> [T, D]
    t, k = weights.shape
    # A gather through the inverse permutation: XLA runs row gathers faster than row scatters.
    y = (ys if position is None else ys[position]).reshape(t, k, -1)  # [T, k, D]
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
                    mesh: Mesh, valid: jax.Array | None = None, dispatch_method: str = "auto",
                    route_implementation: str = "xla") -> jax.Array:
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
            y = _local_moe(p_, x_, top_k, policy, implementation, v_, dispatch_method, route_implementation)
        else:
            y = _expert_parallel_local(p_, x_, v_, top_k, policy, implementation, mesh.shape["expert"],
                                       dispatch_method, route_implementation)
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
                           implementation: str, n: int, dispatch_method: str = "auto",
                           route_implementation: str = "xla") -> jax.Array:
    """One device's part: its tokens [Tl, D] in, their MoE outputs out; p holds its El experts."""
    local_experts = p.w_down.shape[0]
    with jax.named_scope("route"):
        weights, experts = route(p.router, x, top_k, valid, route_implementation)  # [Tl, k]
    with jax.named_scope("dispatch"):
        flat = experts.reshape(-1)  # [A]
        a = flat.shape[0]
        # by expert, hence by destination device
        ordering = "auto" if dispatch_method == "unsorted" else dispatch_method  # rows must go out by device
        order, position, _ = dispatch(experts, local_experts * n, ordering)
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
        local_order, local_position, group_sizes = dispatch(recv_ids, local_experts, ordering)
        ys = experts_ffn(p, rows[local_order], group_sizes, policy, implementation)
        back = ys[local_position].reshape(n, a, -1)
    with jax.named_scope("combine"):
        returned = jax.lax.all_to_all(back, "expert", 0, 0)  # [N, A, D]
        results = returned.at[dest, slot].get(mode="fill", fill_value=0)  # [A, D] in `order`
        return combine(results, position, weights, x.dtype)
