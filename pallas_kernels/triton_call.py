"""Kernels written in Triton (`@triton.jit`), called from JAX. On a GPU, launched as XLA's own Triton
custom call (`launcher="xla"`, `triton_lowering.py`: Triton writes the TTIR, XLA compiles and launches
it as Pallas's Triton backend does) or through jax-triton (`launcher="jax-triton"`); on the host in
interpret mode, run by Triton's own interpreter (what the CPU tests run).

The calling convention is jax-triton's: the kernel's parameters are `args` in order (arrays become
pointers, Python scalars stay scalars), then one pointer per output; `constexprs` are its
`tl.constexpr` parameters. `input_output_aliases` maps an array argument's index (among the array
arguments) to the output that shares its buffer, so the kernel writes that input in place; in
interpret mode the two parameters are one tensor, as on the device. Outputs not aliased start as NaN
(integers: their minimum) in interpret mode, so a kernel that leaves an element it should write
fails its tests rather than reading as zeros. The interpreter's float conversions are replaced by
exact ones (ml_dtypes, round to nearest even, as the device converts): its own truncate f32 -> bf16
and lose the carry of a rounded-up mantissa (1.98 -> e4m3 gives 1.0).

Triton (and jax-triton, for its launcher) is imported on first use: a machine that never runs these
kernels needs neither.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

Launcher = Literal["xla", "jax-triton"]
LAUNCHERS: tuple[str, ...] = ("xla", "jax-triton")

# numpy (ml_dtypes) dtypes torch takes only through an integer view of the same width.
_VIEWS = {"bfloat16": ("uint16", "bfloat16"), "float8_e4m3fn": ("uint8", "float8_e4m3fn")}


def load(package: str) -> Any:
    """`pallas_kernels.<package>.triton_jit`, the package's kernel written in Triton, imported on first use;
    one clear error where Triton is not installed."""
    import importlib

    try:
        return importlib.import_module(f"pallas_kernels.{package}.triton_jit")
    except ModuleNotFoundError as e:
        if e.name != "triton" and not (e.name or "").startswith("triton."):
            raise
        raise ImportError("implementation='triton' (or 'jax_triton') needs Triton: pip install "
                          "'jaxfire[triton]'") from e


def call(
    kernel: Any,  # a triton.JITFunction
    *args: jax.Array | int | float | bool,
    out_shape: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...],
    num_warps: int,
    num_stages: int,
    input_output_aliases: Mapping[int, int] | None = None,
    interpret: bool = False,
    launcher: Launcher = "xla",
    name: str = "",
    **constexprs: Any,
) -> Any:
    """Runs `kernel` over `grid` and returns its outputs (one array, or a list for a sequence
    `out_shape`)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    single = isinstance(out_shape, jax.ShapeDtypeStruct)
    shapes = [out_shape] if single else list(out_shape)
    aliases = dict(input_output_aliases or {})
    grid = tuple(int(g) for g in grid)
    if any(g == 0 for g in grid):  # no program runs: the outputs are the aliased inputs, or empty
        arrays = [a for a in args if not _is_scalar(a)]
        inputs = {o: arrays[i] for i, o in aliases.items()}
        outs = [inputs[j] if j in inputs else jax.numpy.zeros(s.shape, s.dtype) for j, s in enumerate(shapes)]
    elif interpret:
        outs = _interpret(kernel, args, shapes, grid, aliases, constexprs)
    elif launcher == "xla":
        from pallas_kernels import triton_lowering

        names = _parameter_names(kernel, args, shapes, constexprs)
        scalars = {n: a for n, a in zip(names, args) if _is_scalar(a)}
        signature = {n: _triton_type(v) for n, v in zip(names, list(args) + shapes) if n not in scalars}
        outs = triton_lowering.call(
            kernel, [a for a in args if not _is_scalar(a)], signature=signature, constexprs={**constexprs, **scalars},
            out_shapes=shapes, grid=grid, num_warps=num_warps, num_stages=num_stages, input_output_aliases=aliases,
            name=name or kernel.__name__)
    else:
        try:
            import jax_triton
        except ImportError as e:
            raise ImportError(
                f"the Triton kernel {name or kernel.__name__} runs through jax-triton, which is not installed "
                "here: pip install 'jaxfire[cuda12]' (or [cuda13]) installs it beside JAX's GPU build") from e
        outs = jax_triton.triton_call(*args, kernel=kernel, out_shape=shapes, grid=grid, name=name,
                                      num_warps=num_warps, num_stages=num_stages,
                                      input_output_aliases=aliases, **constexprs)
    return outs[0] if single else list(outs)


def compile_for(
    kernel: Any,
    *args: Any,  # arrays (or jax.ShapeDtypeStruct) and Python scalars, as `call` takes them
    out_shape: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
    num_warps: int,
    num_stages: int,
    capability: int = 90,
    **constexprs: Any,
) -> Any:
    """Compiles `kernel` with Triton for a GPU of compute `capability` (default Hopper) as `call` would
    launch it through jax-triton (scalars stay parameters; XLA's launch makes them constants), on any
    machine (no GPU needed: Triton carries its own ptxas). Returns Triton's
    CompiledKernel (its `asm` holds ttgir, ptx and cubin; `metadata.shared` its shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget

    shapes = [out_shape] if isinstance(out_shape, jax.ShapeDtypeStruct) else list(out_shape)
    names = _parameter_names(kernel, args, shapes, constexprs)
    signature = {n: _triton_type(v) for n, v in zip(names, list(args) + shapes)}
    return triton.compile(source(kernel, signature, constexprs), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def source(kernel: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any]) -> Any:
    """Triton's ASTSource of `kernel`: `signature` types its other parameters (`_triton_type`), every
    pointer marked 16-byte aligned as jax-triton marks them (XLA's buffers are: vector loads, cp.async)."""
    from triton.compiler import ASTSource

    params = list(kernel.arg_names)
    aligned = {(params.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    return ASTSource(fn=kernel, signature={**signature, **{n: "constexpr" for n in constexprs}},
                     constexprs=dict(constexprs), attrs=aligned)


def _parameter_names(kernel: Any, args: Sequence[Any], shapes: Sequence[Any], constexprs: Mapping[str, Any]) -> list[str]:
    """The kernel's non-constexpr parameters, which take `args` and then one pointer per output."""
    names = [n for n in kernel.arg_names if n not in constexprs]
    if len(names) != len(args) + len(shapes):
        raise ValueError(f"{kernel.__name__} takes {len(names)} non-constexpr parameters, got {len(args)} arguments "
                         f"and {len(shapes)} outputs")
    return names


_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                 "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5", "int8": "i8", "int16": "i16", "int32": "i32",
                 "int64": "i64", "uint8": "u8", "uint16": "u16", "uint32": "u32", "bool": "i1"}


def _triton_type(v: Any) -> str:
    """The type jax-triton gives a kernel parameter (0.3.1's `get_triton_type`): a Python float is fp64
    there, so a kernel that wants fp32 math takes np.float32 or a constexpr."""
    if isinstance(v, (bool, np.bool_)):
        return "i1"
    if isinstance(v, (int, np.integer)):
        v = int(v)
        for name, lo, hi in (("i32", -2 ** 31, 2 ** 31), ("u32", 0, 2 ** 32), ("i64", -2 ** 63, 2 ** 63)):
            if lo <= v < hi:
                return name
        return "u64"
    if isinstance(v, np.float32):
        return "fp32"
    if isinstance(v, (float, np.floating)):
        return "fp64"
    return "*" + _TRITON_TYPES[np.dtype(v.dtype).name]


def _is_scalar(a: Any) -> bool:
    return isinstance(a, (bool, int, float, np.bool_, np.floating, np.integer))


def _interpret(kernel, args, shapes, grid, aliases, constexprs) -> list[jax.Array]:
    """The kernel in Triton's interpreter, on the host, under `jax.pure_callback`."""
    positions = [i for i, a in enumerate(args) if not _is_scalar(a)]
    arrays = [args[i] for i in positions]

    def host(*values: np.ndarray) -> tuple[np.ndarray, ...]:
        import torch

        tensors = [_to_torch(np.array(v, copy=True), torch) for v in values]
        by_output = {o: tensors[i] for i, o in aliases.items()}
        outs = [by_output.get(j) if j in by_output else _poisoned(s, torch) for j, s in enumerate(shapes)]
        params = list(args)
        for i, t in zip(positions, tensors):
            params[i] = t
        with np.errstate(over="ignore", under="ignore"):  # as on the device: exp(88.8) is inf, silently
            _interpreted(kernel)[grid](*params, *outs, **constexprs)
        return tuple(_to_numpy(t, s.dtype, torch) for t, s in zip(outs, shapes))

    result = jax.pure_callback(host, [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes], *arrays)
    return list(result)


@functools.cache
def _interpreted(kernel) -> Callable:
    from triton.runtime import interpreter

    _fix_interpreter(interpreter)
    return interpreter.InterpretedFunction(getattr(kernel, "fn", kernel))


@functools.cache
def _fix_interpreter(interpreter) -> None:
    """Closes the gaps of Triton 3.6's interpreter that the kernels meet (the device has none of them):
    - float conversions go through ml_dtypes, rounding to nearest even (its own truncate f32 -> bf16 and
      drop the carry of a rounded-up mantissa);
    - a `@triton.jit` function called inside a kernel (`tl.max`, `tl.sum`, `tl.zeros`, helpers of our
      own) runs interpreted, as it would with TRITON_INTERPRET=1 set before Triton was imported;
    - a loop over traced bounds indexes its scalar bounds with `.item()` (numpy >= 2.5 refuses `int()`
      of a one-element array);
    - a bf16 dot widens its inputs to f32 (exact) first, where it would multiply the 16-bit patterns as
      integers."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    _exact_conversions(interpreter, tl)
    nested: dict[Callable, Any] = {}

    def run_nested(self, *args, **kwargs):
        if self.fn not in nested:
            nested[self.fn] = interpreter.InterpretedFunction(self.fn)
        # (its patch of triton.language is undone on return, as the kernel's own is when it ends:
        # a Triton compile later in the process must see the language as it was)
        scope = interpreter._patch_lang(self.fn)
        try:
            return nested[self.fn].rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    JITFunction.__call__ = run_nested  # reached only from inside an interpreted kernel

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched_tensor
    dot = interpreter.InterpreterBuilder.create_dot

    def widened(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _exact_conversions(interpreter, tl) -> None:
    """Routes the interpreter's float conversions through ml_dtypes (round to nearest even), keeping its
    own only for what that does not cover (round toward zero, other float formats)."""
    import ml_dtypes

    types = {tl.float64: np.float64, tl.float32: np.float32, tl.float16: np.float16, tl.bfloat16: ml_dtypes.bfloat16,
             tl.float8e4nv: ml_dtypes.float8_e4m3fn, tl.float8e5: ml_dtypes.float8_e5m2}
    own = interpreter._convert_float
    rtz = interpreter._ir.ROUNDING_MODE.RTZ

    def convert(data, input_dtype, output_dtype, rounding_mode):
        src, dst = types.get(input_dtype), types.get(output_dtype)
        if src is None or dst is None or rounding_mode == rtz:
            return own(data, input_dtype, output_dtype, rounding_mode)
        x = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=src)
        wide = x if src == np.float64 else x.astype(np.float32)  # exact, then one rounding
        out = wide.astype(dst)
        return out.view(f"uint{8 * out.dtype.itemsize}").reshape(data.shape)

    interpreter._convert_float = convert


def _to_torch(a: np.ndarray, torch):
    if a.dtype.name in _VIEWS:
        int_name, torch_name = _VIEWS[a.dtype.name]
        return torch.from_numpy(a.view(int_name)).view(getattr(torch, torch_name))
    return torch.from_numpy(a)


def _to_numpy(t, dtype, torch) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.name in _VIEWS:
        int_name, _ = _VIEWS[dtype.name]
        return t.view(getattr(torch, int_name)).numpy().view(dtype)
    return t.numpy()


def _poisoned(shape: jax.ShapeDtypeStruct, torch):
    dtype = np.dtype(shape.dtype)
    if np.issubdtype(dtype, np.integer):
        fill = np.full(shape.shape, np.iinfo(dtype).min, dtype)
    elif dtype == np.bool_:
        fill = np.zeros(shape.shape, dtype)
    else:
        fill = np.full(shape.shape, np.nan, np.float32).astype(dtype)
    return _to_torch(fill, torch)
