"""A kernel written in Triton (`@triton.jit`), lowered to XLA's own Triton custom call
(`__gpu$xla.gpu.triton`, the call Pallas's Triton backend emits) instead of jax-triton's.

Triton's frontend writes the kernel's TTIR; JAX's MLIR reads it back through jaxlib's Triton dialect
(the version of Triton that XLA compiles with), so a kernel XLA could not read fails at lowering with
the parser's message, not at compile time on the GPU. XLA then compiles the kernel with the rest of the
program and launches it as one of its own kernels: no host work per launch, and the launch can sit
inside a command buffer (jax-triton's custom call is a host callback that loads and launches the
kernel itself, 6-30 us a launch more in `bench/decode_attention.py`).

XLA hands a Triton kernel buffers only, the custom call's operands then its results: scalar
parameters are specialised into the TTIR as constants, which they are anyway under jit.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax.extend.core import Primitive

CUSTOM_CALL_TARGET = "__gpu$xla.gpu.triton"
DEFAULT_CAPABILITY = 90  # Hopper, where no GPU is attached (lowering for export, the CPU tests)

triton_call_p = Primitive("jaxfire_triton_call")
triton_call_p.multiple_results = True


def call(kernel: Any, arrays: Sequence[jax.Array], *, signature: Mapping[str, str], constexprs: Mapping[str, Any],
         out_shapes: Sequence[jax.ShapeDtypeStruct], grid: tuple[int, ...], num_warps: int, num_stages: int,
         input_output_aliases: Mapping[int, int], name: str) -> list[jax.Array]:
    """Launches `kernel` over `grid` on `arrays` (its pointer parameters in order, then one per output);
    `signature` types every non-constexpr parameter as `triton_call._triton_type` does, `constexprs`
    holds the rest (scalars included)."""
    return triton_call_p.bind(
        *arrays, kernel=kernel, signature=tuple(signature.items()), constexprs=tuple(constexprs.items()),
        out_shapes=tuple((tuple(s.shape), np.dtype(s.dtype)) for s in out_shapes), grid=_grid3(grid),
        num_warps=int(num_warps), num_stages=int(num_stages),
        input_output_aliases=tuple(sorted(input_output_aliases.items())), name=mlir.sanitize_name(name))


def ttir(kernel: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any], *,
         capability: int = DEFAULT_CAPABILITY) -> str:
    """The kernel's TTIR (after Triton's own TTIR passes: helpers inlined, dead code gone) as text, with
    every pointer parameter marked 16-byte aligned (XLA's buffers are)."""
    return _ttir(kernel, tuple(signature.items()), tuple(constexprs.items()), capability)


def module_bytecode(text: str, name: str) -> bytes:
    """`text` (TTIR) parsed in an MLIR context with jaxlib's Triton dialect, its public function renamed
    `name` (what XLA looks up and what profiles show), as MLIR bytecode. A module this Triton dialect
    cannot read raises ValueError with the parser's message."""
    with ir_context(), ir.Location.unknown():
        try:
            module = ir.Module.parse(text)
        except ir.MLIRError as e:
            raise ValueError(f"jaxlib's Triton dialect cannot read the TTIR of {name}: {e}") from e
        public = [op for op in module.body.operations if op.operation.name == "tt.func"
                  and ir.StringAttr(op.attributes["sym_visibility"]).value == "public"]
        if len(public) != 1:
            raise ValueError(f"the TTIR of {name} has {len(public)} public functions, not one")
        public[0].attributes["sym_name"] = ir.StringAttr.get(name)
        buf = io.BytesIO()
        module.operation.write_bytecode(buf)
    return buf.getvalue()


def ir_context() -> ir.Context:
    """An MLIR context of JAX's with jaxlib's Triton dialect loaded (the one XLA compiles with)."""
    from jax._src.lib.triton import dialect as tt_dialect

    ctx = mlir.JaxIrContext()
    ctx.append_dialect_registry(mlir.upstream_dialects)
    tt_dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    return ctx


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"a Triton grid has one to three dimensions, got {grid}")
    return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


@functools.lru_cache(maxsize=512)
def _ttir(kernel: Any, signature: tuple, constexprs: tuple, capability: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton._C.libtriton import ir as tir

    from pallas_kernels import triton_call

    source = triton_call.source(kernel, dict(signature), dict(constexprs))
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options = backend.parse_options(source.parse_options())
    context = tir.context()
    tir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    stages: dict[str, Any] = {}
    backend.add_stages(stages, options, source.language)
    return str(stages["ttir"](module, {}))


@functools.cache
def _capability() -> int:
    """The attached GPU's compute capability (90 for sm_90), or Hopper's where there is none."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return DEFAULT_CAPABILITY
    return int(str(device.compute_capability).replace(".", ""))


def _abstract_eval(*avals, out_shapes, **_):
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in out_shapes]


def _layouts(avals) -> list[list[int]]:
    return [list(reversed(range(a.ndim))) for a in avals]


def _lowering(ctx, *operands, kernel, signature, constexprs, out_shapes, grid, num_warps, num_stages,
              input_output_aliases, name):
    del out_shapes  # ctx.avals_out
    bytecode = module_bytecode(_ttir(kernel, signature, constexprs, _capability()), name)
    backend_config = dict(
        name=ir.StringAttr.get(name), ir=ir.StringAttr.get(bytecode), num_stages=mlir.i32_attr(num_stages),
        num_warps=mlir.i32_attr(num_warps), grid_x=mlir.i32_attr(grid[0]), grid_y=mlir.i32_attr(grid[1]),
        grid_z=mlir.i32_attr(grid[2]), debug=ir.BoolAttr.get(False))
    return mlir.custom_call(
        call_target_name=CUSTOM_CALL_TARGET, result_types=[mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_out],
        operands=list(operands), backend_config=backend_config, api_version=4,
        operand_layouts=_layouts(ctx.avals_in), result_layouts=_layouts(ctx.avals_out),
        operand_output_aliases=dict(input_output_aliases)).results


triton_call_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(triton_call_p, _lowering, platform="cuda")
