"""The MIL program compiled once into a list of bound torch calls: the fast engine behind
`mil_eval.MilModel`, so Apple-target validation takes minutes instead of half an hour.

Why a second engine beside the op-by-op interpreter in `mil_eval`: the interpreter re-reads the
program for every token (dict lookups, coremltools' `Var.val`, dtype inference), computes fp16
products in NumPy (no BLAS for fp16) and copies every view, including a KV-cache slice per layer and
per token. Here that work happens once, at load:

- every value gets a slot in a list, every const is resolved (and converted) once, every
  `constexpr_blockwise_shift_scale` is dequantized once into an fp16 tensor (within the same cache
  budget the interpreter has; beyond it, per call, freed after its last reader), unless the
  program's weights would not fit that budget at all (7B/8B): then its 4-bit linears run from their
  codes through ONNX Runtime's MatMulNBits (`mil_nbits`) and the budget goes to the rest (the
  embedding and the 8-bit lm_head);
- float values are torch tensors of the program's declared dtype; integer and boolean values (the
  program's shape arithmetic) stay NumPy and run through the interpreter's own ops;
- views stay views: a static alias analysis decides which `slice_update` may write in place (no
  reader of an older alias of its buffer runs after it), and recognises the KV-cache write-back
  pattern torch.export leaves (`slice_update(R, slice_update(slice_by_index(R, r), u), r)`), so a
  decode step writes one row of the cache instead of copying it.

Numerics are the interpreter's, which are Core ML's fp16 storage semantics: each op computes in fp32
and rounds its result to the declared dtype. torch's fp16 elementwise and reduction kernels on the
CPU do exactly that (they widen to fp32 internally); a one-row `linear` uses torch's fp16 GEMV,
which accumulates in fp32; larger products, attention and softmax widen explicitly, because torch's
fp16 GEMM and SDPA on the CPU reduce in lower precision. Products may therefore differ from the
interpreter's by fp32 summation order, i.e. an fp16 ulp at most (tests/test_coreml.py checks
each kernel against PyTorch, and whole programs against the interpreter).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llamaship.errors import RuntimeFailure
from llamaship.runtime.mil_eval import OPS, Program, _np_dtype

TORCH_DTYPE = {np.float16: torch.float16, np.float32: torch.float32}


def _ints(a: Any) -> list[int]:
    return [int(v) for v in np.atleast_1d(np.asarray(a))]


def _f32(x: Any) -> torch.Tensor:
    return x.float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))


# ----- float kernels: named like the op's inputs; results are rounded to the declared dtype by the
# caller when torch's result dtype differs -----

def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.numel() == x.shape[-1] and x.dtype == weight.dtype == torch.float16 and bias is None:
        return x @ weight.T  # fp16 GEMV: fp32 accumulation, one rounding
    y = x.float() @ weight.float().T
    return y + bias.float() if bias is not None else y


def _matmul(x: torch.Tensor, y: torch.Tensor, transpose_x: bool = False, transpose_y: bool = False) -> torch.Tensor:
    a, b = x.float(), y.float()
    return (a.transpose(-1, -2) if transpose_x else a) @ (b.transpose(-1, -2) if transpose_y else b)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
    mask: torch.Tensor | None = None
    if attn_mask is not None:
        mask = (torch.from_numpy(np.asarray(attn_mask)) if isinstance(attn_mask, np.ndarray)
                and attn_mask.dtype == np.bool_ else _f32(attn_mask))
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask)


def _slices(rank: int, begin: Any, end: Any, stride: Any, begin_mask: Any, end_mask: Any,
            squeeze_mask: Any = None) -> tuple[int | slice, ...]:
    b, e = _ints(begin), _ints(end)
    s = [1] * rank if stride is None else _ints(stride)
    bm = [False] * rank if begin_mask is None else list(np.atleast_1d(begin_mask))
    em = [False] * rank if end_mask is None else list(np.atleast_1d(end_mask))
    sq = [False] * rank if squeeze_mask is None else list(np.atleast_1d(squeeze_mask))
    if any(v <= 0 for v in s):
        raise RuntimeFailure("MIL evaluator: slice with a non-positive stride is not supported")
    return tuple(b[i] if sq[i] else slice(None if bm[i] else b[i], None if em[i] else e[i], s[i])
                 for i in range(rank))


def _slice_by_index(x: torch.Tensor, begin: Any, end: Any, stride: Any = None, begin_mask: Any = None,
                    end_mask: Any = None, squeeze_mask: Any = None) -> torch.Tensor:
    return x[_slices(x.dim(), begin, end, stride, begin_mask, end_mask, squeeze_mask)]


def _slice_update(x: torch.Tensor, update: torch.Tensor, begin: Any, end: Any, stride: Any = None,
                  begin_mask: Any = None, end_mask: Any = None, squeeze_mask: Any = None,
                  in_place: bool = False) -> torch.Tensor:
    return _write(x, update, _slices(x.dim(), begin, end, stride, begin_mask, end_mask), in_place)


def _write(x: torch.Tensor, update: torch.Tensor, idx: tuple[int | slice, ...], in_place: bool) -> torch.Tensor:
    """`update` into x[idx], into x itself when the plan proved that safe, else into a copy; a
    write-back of what is already there (the KV-cache pattern after an in-place update) copies
    nothing."""
    out = x if in_place else x.clone()
    target = out[idx]
    if not (update.data_ptr() == target.data_ptr() and update.shape == target.shape
            and update.stride() == target.stride()):
        target.copy_(update.reshape(target.shape))
    return out


def _gather(x: torch.Tensor, indices: Any, axis: Any = 0, batch_dims: Any = 0,
            validate_indices: Any = False) -> torch.Tensor:
    if int(batch_dims):
        raise RuntimeFailure("MIL evaluator: gather with batch_dims is not supported")
    idx = np.asarray(indices).astype(np.int64)
    ax = int(axis) % x.dim()
    n = x.shape[ax]
    if np.any(idx >= n) or np.any(idx < -n):
        raise RuntimeFailure(f"MIL evaluator: gather index out of range (axis size {n}, max {idx.max()})")
    flat = torch.from_numpy(idx.reshape(-1) % n)
    out = x.index_select(ax, flat)
    return out.reshape(*x.shape[:ax], *idx.shape, *x.shape[ax + 1:])


def _reshape(x: torch.Tensor, shape: Any) -> torch.Tensor:
    dims = _ints(shape)
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(dims)])


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def op(x: torch.Tensor, axes: Any = None, keep_dims: Any = False) -> torch.Tensor:
        dims = list(range(x.dim())) if axes is None else _ints(axes)
        return fn(x, dim=dims, keepdim=bool(keep_dims))
    return op


def _select(cond: Any, a: Any, b: Any) -> torch.Tensor:
    c = torch.from_numpy(np.asarray(cond, dtype=bool)) if not isinstance(cond, torch.Tensor) else cond.bool()
    return torch.where(c, a if isinstance(a, torch.Tensor) else _f32(a), b if isinstance(b, torch.Tensor) else _f32(b))


def _cast(x: Any, dtype: str) -> torch.Tensor:
    if dtype not in ("fp16", "fp32"):
        raise RuntimeFailure(f"MIL evaluator: cast to {dtype} is not supported")
    want = torch.float16 if dtype == "fp16" else torch.float32
    return x.to(want) if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x)).to(want)


KERNELS: dict[str, Callable[..., Any]] = {
    "add": lambda x, y: torch.add(x, y),
    "sub": lambda x, y: torch.sub(x, y),
    "mul": lambda x, y: torch.mul(x, y),
    "real_div": lambda x, y: torch.div(x, y),
    "pow": lambda x, y: torch.square(x) if float(y) == 2.0 else torch.pow(x, y),
    "sqrt": lambda x: torch.sqrt(x),
    "abs": lambda x: torch.abs(x),
    "minimum": lambda x, y: torch.minimum(x, _f32(y).to(x.dtype) if not isinstance(y, torch.Tensor) else y),
    "maximum": lambda x, y: torch.maximum(x, _f32(y).to(x.dtype) if not isinstance(y, torch.Tensor) else y),
    "clip": lambda x, alpha, beta: torch.clamp(x, float(alpha), float(beta)),
    "inverse": lambda x, epsilon=1e-4: 1.0 / (x.float() + float(epsilon)),
    "rsqrt": lambda x, epsilon=1e-12: torch.rsqrt(x.float() + float(epsilon)),
    "exp": lambda x: torch.exp(x),
    "silu": lambda x: F.silu(x),
    "sigmoid": lambda x: torch.sigmoid(x),
    "reduce_mean": _reduce(torch.mean),
    "reduce_sum": _reduce(torch.sum),
    "reduce_max": _reduce(torch.amax),
    "linear": _linear,
    "matmul": _matmul,
    "softmax": lambda x, axis=-1: torch.softmax(x.float(), int(axis)),
    "scaled_dot_product_attention": _sdpa,
    "gather": _gather,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "concat": lambda values, axis, interleave=False: torch.cat(
        [v if isinstance(v, torch.Tensor) else _f32(v) for v in values], int(axis)),
    "reshape": _reshape,
    "transpose": lambda x, perm: x.permute(_ints(perm)),
    "expand_dims": lambda x, axes: _expand_dims(x, _ints(axes)),
    "squeeze": lambda x, axes=None: x.squeeze() if axes is None else x.squeeze(tuple(_ints(axes))),
    "tile": lambda x, reps: x.repeat(_ints(reps)),
    "cast": _cast,
    "identity": lambda x: x,
    "select": _select,
}

Prepared = tuple[Callable[..., Any], list[str]]


def _has(static: dict[str, Any], *names: str) -> bool:
    return all(n in static for n in names)


def _region(static: dict[str, Any], rank: int | None, squeeze: bool) -> tuple[int | slice, ...] | None:
    if rank is None or not _has(static, "begin", "end"):
        return None
    try:
        return _slices(rank, static["begin"], static["end"], static.get("stride"), static.get("begin_mask"),
                       static.get("end_mask"), static.get("squeeze_mask") if squeeze else None)
    except RuntimeFailure:
        return None


def _prep_slice_by_index(static: dict[str, Any], rank: int | None, in_place: bool) -> Prepared | None:
    idx = _region(static, rank, squeeze=True)
    return None if idx is None else ((lambda x: x[idx]), ["x"])


def _prep_slice_update(static: dict[str, Any], rank: int | None, in_place: bool) -> Prepared | None:
    idx = _region(static, rank, squeeze=False)
    if idx is None:
        return None
    return (lambda x, update: _write(x, update, idx, in_place)), ["x", "update"]


def _prep_reshape(static: dict[str, Any], rank: int | None, in_place: bool) -> Prepared | None:
    if "shape" not in static:
        return None
    dims = _ints(static["shape"])
    return None if 0 in dims else ((lambda x: x.reshape(dims)), ["x"])


def _prep_axes(make: Callable[[Any], Callable[[torch.Tensor], torch.Tensor]],
               key: str) -> Callable[..., Prepared | None]:
    def prep(static: dict[str, Any], rank: int | None, in_place: bool) -> Prepared | None:
        return (make(_ints(static[key])), ["x"]) if key in static and static[key] is not None else None
    return prep


def _prep_reduce(fn: Callable[..., torch.Tensor]) -> Callable[..., Prepared | None]:
    def prep(static: dict[str, Any], rank: int | None, in_place: bool) -> Prepared | None:
        if "axes" not in static or static["axes"] is None or "keep_dims" not in static:
            return None
        dims, keep = _ints(static["axes"]), bool(static["keep_dims"])
        return (lambda x: fn(x, dim=dims, keepdim=keep)), ["x"]
    return prep


PREPARED: dict[str, Callable[[dict[str, Any], int | None, bool], Prepared | None]] = {
    "slice_by_index": _prep_slice_by_index,
    "slice_update": _prep_slice_update,
    "reshape": _prep_reshape,
    "transpose": _prep_axes(lambda perm: lambda x: x.permute(perm), "perm"),
    "tile": _prep_axes(lambda reps: lambda x: x.repeat(reps), "reps"),
    "expand_dims": _prep_axes(lambda axes: lambda x: _expand_dims(x, axes), "axes"),
    "reduce_mean": _prep_reduce(torch.mean),
    "reduce_sum": _prep_reduce(torch.sum),
    "reduce_max": _prep_reduce(torch.amax),
}


# ops whose result may share memory with their `x` (a view): the alias analysis follows them
VIEW_OPS = {"slice_by_index", "reshape", "transpose", "expand_dims", "squeeze", "identity", "read_state",
            "coreml_update_state"}


def _expand_dims(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def _is_float(var: Any) -> bool:
    return _np_dtype(var) in TORCH_DTYPE


def _to_numpy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.numpy()
    if isinstance(v, list):
        return [_to_numpy(x) for x in v]
    return v


class _Step:
    """One op bound to its slots: `args` holds consts in place and `slots` says which positions are
    filled from the environment at run time (a list input is a list of (const, slot) pairs)."""

    __slots__ = ("op", "fn", "args", "slots", "lists", "out", "dtype", "free")

    def __init__(self, op: Any, fn: Callable[..., Any], args: list[Any], slots: list[tuple[int, int]],
                 lists: list[tuple[int, list[tuple[Any, int]]]], out: int, dtype: Any) -> None:
        self.op, self.fn, self.args, self.slots, self.lists = op, fn, args, slots, lists
        self.out, self.dtype = out, dtype
        self.free: list[int] = []

    def __call__(self, env: list[Any]) -> None:
        args = self.args.copy()
        for pos, slot in self.slots:
            args[pos] = env[slot]
        for pos, items in self.lists:
            args[pos] = [c if s < 0 else env[s] for c, s in items]
        r = self.fn(*args)
        if self.dtype is not None and r.dtype != self.dtype:
            r = r.to(self.dtype)
        env[self.out] = r
        for s in self.free:
            env[s] = None


class Plan:
    """`Program` compiled into `_Step`s. `run(inputs, states)` mutates `states` (name -> tensor) the
    way Core ML's state does and returns the outputs as NumPy arrays."""

    def __init__(self, program: Program, weight_cache_bytes: int) -> None:
        self.program = program
        self.slot: dict[str, int] = {}
        self.consts: dict[str, Any] = {}  # name -> value resolved at load (weights dequantized)
        self._cache_left = weight_cache_bytes
        self._states: dict[str, torch.Tensor] = {}
        fn = program.function
        self.inputs = [(name, self._slot(name), _np_dtype(var)) for name, var in fn.inputs.items()
                       if name not in program.state_names]
        self.steps: list[_Step] = []
        ops = [op for op in program.ops if op.op_type != "const"]
        in_place = self._in_place_ops(ops)
        self.nbits = nbits_weights(ops, weight_cache_bytes)
        for op in ops:
            if op.op_type == "constexpr_blockwise_shift_scale" and (
                    op.outputs[0].name in self.nbits or self._dequantize_at_load(op)):
                continue
            self.steps.append(self._bind(op, id(op) in in_place))
        self.outputs = [(name, self.slot[name]) for name in program.output_names]
        self._mark_frees()

    # ----- load -----

    def _slot(self, name: str) -> int:
        return self.slot.setdefault(name, len(self.slot))

    def _const(self, var: Any) -> Any:
        if var.name in self.consts:
            return self.consts[var.name]
        val = self.program.value(var)
        if isinstance(val, np.ndarray) and val.dtype in (np.float16, np.float32):
            # writable, in the declared dtype: a weight read from the package is already our own copy
            val = torch.from_numpy(val if self.program.deferred(var) else np.array(val))
        elif isinstance(val, (np.floating, float)) and _is_float(var):
            val = float(val)
        self.consts[var.name] = val
        return val

    def _dequantize_at_load(self, op: Any) -> bool:
        """Dequantized once, rounded to the program's dtype as Core ML does at load, while the budget
        lasts; False leaves it a step run on every call (its result freed after its last reader)."""
        out = op.outputs[0]
        nbytes = int(np.prod(out.shape)) * np.dtype(_np_dtype(out)).itemsize
        if nbytes > self._cache_left:
            return False
        self._cache_left -= nbytes
        args = {k: self.program.value(v) for k, v in op.inputs.items()}
        w = dequantize(args["data"], args["scale"], args.get("offset"))
        self.consts[out.name] = w.to(TORCH_DTYPE[_np_dtype(out)])
        return True

    def _nbits_linear(self, op: Any) -> Callable[..., Any]:
        from coremltools.converters.mil.mil import types

        from llamaship.runtime.mil_nbits import NBitsLinear

        data, offset = op.inputs["data"], op.inputs.get("offset")
        return NBitsLinear(self.program.value(data), self.program.value(op.inputs["scale"]),
                           None if offset is None else self.program.value(offset),
                           signed=types.builtin_to_string(data.dtype) == "int4")

    def _kernel(self, op: Any, in_place: bool, static: dict[str, Any]) -> tuple[Callable[..., Any], list[str]]:
        """The callable for `op` and the input names it takes at run time; inputs in `static` (consts)
        are folded in where a prepared kernel exists (indices, shapes, axes computed once)."""
        kind, out = op.op_type, op.outputs[0]
        if kind == "read_state":
            name = op.inputs["input"].name
            return (lambda: self._states[name]), []
        if kind == "coreml_update_state":
            return partial(self._update_state, op.inputs["state"].name), ["value"]
        if kind == "constexpr_blockwise_shift_scale":
            return dequantize, ["data", "scale", "offset"]
        if kind == "linear" and op.inputs["weight"].name in self.nbits:
            return self._nbits_linear(self.nbits[op.inputs["weight"].name]), ["x", "bias"]
        if not _is_float(out):  # integer / bool results: the program's shape arithmetic
            fn = _numpy_op(OPS[kind], False)
            return fn, list(inspect.signature(fn).parameters)
        if kind in PREPARED and set(op.inputs) - set(static) <= {"x", "update"}:
            x = op.inputs.get("x")
            rank = len(x.shape) if x is not None and not isinstance(x, (list, tuple)) else None
            prepared = PREPARED[kind](static, rank, in_place)
            if prepared is not None:
                return prepared
        fn = KERNELS.get(kind) or _numpy_op(OPS[kind], True)
        params = list(inspect.signature(fn).parameters)
        if kind == "slice_update":
            return partial(fn, in_place=in_place), [p for p in params if p != "in_place"]
        return fn, params

    def _bind(self, op: Any, in_place: bool) -> _Step:
        out = op.outputs[0]
        static = {k: self._const(v) for k, v in op.inputs.items()
                  if not isinstance(v, (list, tuple)) and self._is_static(v)}
        if op.op_type == "linear" and isinstance(static.get("bias"), torch.Tensor) and not torch.any(static["bias"]):
            static["bias"] = None  # a zero bias adds nothing and costs a widening
        fn, params = self._kernel(op, in_place, static)
        args: list[Any] = []
        slots: list[tuple[int, int]] = []
        lists: list[tuple[int, list[tuple[Any, int]]]] = []
        defaults = _defaults(fn)
        for pos, name in enumerate(params):
            var = op.inputs.get(name)
            if var is None:  # an optional input the op leaves out: the kernel's default
                args.append(defaults.get(name))
            elif isinstance(var, (list, tuple)):
                args.append(None)
                lists.append((pos, [self._value_or_slot(v) for v in var]))
            elif name in static:
                args.append(static[name])
            else:
                args.append(None)
                slots.append((pos, self._slot(var.name)))
        dtype = TORCH_DTYPE.get(_np_dtype(out)) if _is_float(out) else None
        return _Step(op, fn, args, slots, lists, self._slot(out.name), dtype)

    def _is_static(self, var: Any) -> bool:
        return var.name not in self.slot and (var.name in self.consts or var.val is not None)

    def _value_or_slot(self, var: Any) -> tuple[Any, int]:
        return (self._const(var), -1) if self._is_static(var) else (None, self._slot(var.name))

    def _update_state(self, name: str, value: torch.Tensor) -> torch.Tensor:
        dst = self._states[name]
        if not (value.data_ptr() == dst.data_ptr() and value.stride() == dst.stride()):
            dst.copy_(value.reshape(dst.shape))
        return dst

    def _in_place_ops(self, ops: list[Any]) -> set[int]:
        """The float `slice_update`s that may write into their input's buffer: no reader of an older
        value sharing that buffer (through views) runs after them, the buffer is not a caller's
        input or a program output, and a state buffer is only written when the program then stores
        the result in that state. A reader that writes the same, unmoved region back (the
        write-back of the KV-cache pattern) does not count: it reads what the update left."""
        pos = {id(op): i for i, op in enumerate(ops)}
        root: dict[str, str] = {}
        born: dict[str, int] = {}
        readers: dict[str, list[Any]] = {}
        for i, op in enumerate(ops):
            out = op.outputs[0].name
            # read_state's value is the state buffer, and so is coreml_update_state's (it stores there)
            x = {"read_state": op.inputs.get("input"), "coreml_update_state": op.inputs.get("state")}.get(
                op.op_type, op.inputs.get("x"))
            src = x.name if x is not None and not isinstance(x, (list, tuple)) else None
            # a slice_update may run in place: its result counts as a view of its input here
            aliasing = op.op_type in VIEW_OPS or op.op_type == "slice_update"
            root[out] = root.get(src, src) if (aliasing and src) else out
            born[out] = i
            for key, v in op.inputs.items():
                if op.op_type == "coreml_update_state" and key == "state":
                    continue  # names the state it overwrites: not a read
                for var in (v if isinstance(v, (list, tuple)) else [v]):
                    readers.setdefault(var.name, []).append(op)
        stored = {op.inputs["state"].name: op.inputs["value"].name for op in ops if op.op_type == "coreml_update_state"}
        fn_inputs = set(self.program.function.inputs) - set(self.program.state_names)
        outputs = set(self.program.output_names)
        allowed: set[int] = set()
        for i, op in enumerate(ops):
            if op.op_type != "slice_update" or not _is_float(op.outputs[0]):
                continue
            x = op.inputs["x"].name
            r = root.get(x, x)
            if r in fn_inputs or any(root.get(o, o) == r for o in outputs):
                continue
            owner = ops[born[r]] if r in born else None
            if r not in self.program.state_names and (owner is None or owner.op_type.startswith("constexpr")):
                continue  # a const or a load-time weight: shared by every call
            if r in self.program.state_names and root.get(stored.get(r, ""), None) != r:
                continue  # would change a state the program does not store
            old = [name for name, rt in root.items() if rt == r and born.get(name, -1) < i] + [r]
            late = [c for name in old for c in readers.get(name, []) if pos[id(c)] > i]
            if all(_writes_back(c, op) for c in late):
                allowed.add(id(op))
        return allowed

    def _mark_frees(self) -> None:
        """Each slot is released after its last reader, so a prefill's activations and per-call
        dequantized weights do not pile up over the program."""
        last: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for _, s in step.slots:
                last[s] = i
            for _, items in step.lists:
                for _, s in items:
                    if s >= 0:
                        last[s] = i
        keep = {s for _, s in self.outputs} | {s for _, s, _ in self.inputs}
        for s, i in last.items():
            if s not in keep:
                self.steps[i].free.append(s)

    # ----- run -----

    def run(self, inputs: dict[str, np.ndarray], states: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        env: list[Any] = [None] * len(self.slot)
        for name, slot, dtype in self.inputs:
            if name not in inputs:
                raise RuntimeFailure(f"MIL evaluator: missing input {name!r}")
            arr = np.array(inputs[name], dtype=dtype)  # a copy: in-place ops never touch the caller's
            env[slot] = torch.from_numpy(arr) if dtype in TORCH_DTYPE else arr
        self._states = states
        step = None
        try:
            for step in self.steps:
                step(env)
        except RuntimeFailure:
            raise
        except Exception as exc:
            assert step is not None
            op = step.op
            raise RuntimeFailure(f"MIL evaluator: {op.op_type} {op.outputs[0].name!r} failed: {exc}") from exc
        finally:
            self._states = {}
        return {name: _to_numpy(env[slot]) for name, slot in self.outputs}


def _nbytes(var: Any) -> int:
    return int(np.prod(var.shape)) * np.dtype(_np_dtype(var) or np.float32).itemsize


def _bits(var: Any) -> int:
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(var.dtype)
    return int("".join(c for c in name if c.isdigit()) or 32)


def nbits_weights(ops: list[Any], budget: int) -> dict[str, Any]:
    """The 4-bit weights that `linear` runs from their codes (`mil_nbits.NBitsLinear`): all that
    qualify, but only when dequantizing every weight would not fit the cache budget (an 8B
    program); below it every weight is dequantized at load, Core ML's own numerics."""
    from llamaship.runtime import mil_nbits

    consts = [op for op in ops if op.op_type == "constexpr_blockwise_shift_scale"]
    if sum(_nbytes(op.outputs[0]) for op in consts) <= budget:
        return {}
    chosen = {}
    for op in consts:
        data, scale, offset, out = op.inputs["data"], op.inputs["scale"], op.inputs.get("offset"), op.outputs[0]
        readers = out.child_ops
        if readers and all(r.op_type == "linear" and r.inputs["weight"] is out for r in readers) and mil_nbits.eligible(
                tuple(data.shape), tuple(scale.shape), None if offset is None else tuple(offset.shape), _bits(data)):
            chosen[out.name] = op
    return chosen


NBITS_BYTES_PER_STORED_BYTE = 1.7  # MatMulNBits' copy of the codes plus its prepacked layout (measured 1.65)
PER_CALL_BYTES_PER_WEIGHT_BYTE = 6  # dequantizing per call goes through fp32 temporaries
RUNTIME_BYTES = 700 << 20  # the interpreter itself: Python, torch, coremltools, onnxruntime, the program


def memory_estimate(program: Program, budget: int) -> int:
    """Bytes the plan will hold for `program`: weights as it will keep them (runs from codes,
    dequantized at load, or the largest one dequantized per call), float consts, states. Checked
    before anything large is read, so a program too large for the machine is refused with the
    reason rather than ended by the OOM killer."""
    ops = [op for op in program.ops if op.op_type != "const"]
    nbits = nbits_weights(ops, budget)
    need, left, per_call = RUNTIME_BYTES, budget, 0
    for op in ops:
        if op.op_type != "constexpr_blockwise_shift_scale":
            continue
        out = op.outputs[0]
        if out.name in nbits:
            stored = sum(int(np.prod(v.shape)) * _bits(v) // 8 for v in op.inputs.values())
            need += int(stored * NBITS_BYTES_PER_STORED_BYTE)
        elif _nbytes(out) <= left:
            left -= _nbytes(out)
            need += _nbytes(out)
        else:
            per_call = max(per_call, _nbytes(out) * PER_CALL_BYTES_PER_WEIGHT_BYTE)
    floats = sum(_nbytes(op.outputs[0]) for op in program.ops
                 if op.op_type == "const" and program.deferred(op.outputs[0])
                 and not any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops))
    states = sum(_nbytes(var) for name, var in program.function.inputs.items() if name in program.state_names)
    return need + per_call + floats + states


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _writes_back(reader: Any, update_op: Any) -> bool:
    """`reader` is `slice_update(R, u, region)` where u = `update_op`'s result, update_op wrote into
    s = slice_by_index(R, region) with the same static region: after an in-place `update_op`,
    R[region] already holds u, so reading R costs nothing stale."""
    if reader is update_op:
        return True
    if reader.op_type != "slice_update" or reader.inputs["update"].name != update_op.outputs[0].name:
        return False
    s = update_op.inputs["x"]
    src = s.op
    if src is None or src.op_type != "slice_by_index" or src.inputs["x"].name != reader.inputs["x"].name:
        return False
    shape = reader.inputs["x"].shape
    a, b = _static_region(src, shape, squeeze=True), _static_region(reader, shape, squeeze=False)
    return a is not None and a == b


def _static_region(op: Any, shape: Any, squeeze: bool) -> tuple[tuple[int, int, int], ...] | None:
    """The (start, stop, step) per axis an indexing op addresses, when its indices are consts and
    the shape is static (None otherwise)."""
    names = ("begin", "end", "stride", "begin_mask", "end_mask") + (("squeeze_mask",) if squeeze else ())
    vals = {}
    for n in names:
        var = op.inputs.get(n)
        if var is not None and var.val is None:
            return None
        vals[n] = None if var is None else var.val
    if vals.get("squeeze_mask") is not None and np.any(vals["squeeze_mask"]):
        return None
    if any(not isinstance(d, (int, np.integer)) for d in shape):
        return None
    try:
        idx = _slices(len(shape), vals["begin"], vals["end"], vals["stride"], vals["begin_mask"], vals["end_mask"])
    except RuntimeFailure:
        return None
    return tuple(sl.indices(int(d)) if isinstance(sl, slice) else (sl, sl + 1, 1)
                 for sl, d in zip(idx, shape, strict=True))


def dequantize(data: Any, scale: Any, offset: Any = None) -> torch.Tensor:
    """scale * (data - offset) per block, as views (the interpreter repeats each scale per element);
    computed in fp32, rounded by the caller to the program's dtype."""
    q = torch.as_tensor(np.asarray(data)).float()
    s = torch.as_tensor(np.asarray(scale, dtype=np.float32))
    for d, n in zip(q.shape, s.shape, strict=True):
        if d % n:
            raise RuntimeFailure(f"MIL evaluator: block shape {tuple(q.shape)} / {tuple(s.shape)} is not integral")
    blocked = [v for d, n in zip(q.shape, s.shape, strict=True) for v in (n, d // n)]
    qb = q.reshape(blocked)
    expand = [v for n in s.shape for v in (n, 1)]
    if offset is not None:
        qb = qb - torch.as_tensor(np.asarray(offset, dtype=np.float32)).reshape(expand)
    return (qb * s.reshape(expand)).reshape(q.shape)


def _numpy_op(op: Callable[..., Any], float_out: bool) -> Callable[..., Any]:
    """An interpreter op on NumPy values (torch inputs viewed as NumPy); a float result goes back to
    torch."""
    params = inspect.signature(op).parameters

    def run(*args: Any) -> Any:
        r = op(*[_to_numpy(a) for a in args])
        return torch.from_numpy(np.ascontiguousarray(r)) if float_out else r

    run.__signature__ = inspect.Signature(list(params.values()))  # type: ignore[attr-defined]
    return run


