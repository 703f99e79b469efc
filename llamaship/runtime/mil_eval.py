"""A NumPy reference evaluator for the MIL programs our Core ML export writes, so the accuracy of the
real converted (and quantized) .mlpackage is measured on Linux, where Core ML does not run.

The saved package is read with coremltools' own MIL-proto loader (the program as stored: ops, const
weights from weight.bin, states); each op is then executed here in NumPy. Tensors keep the dtype the
program declares (fp16 everywhere after fp16 conversion) and each op computes in fp32 and rounds its
result to that dtype, which is how Core ML's fp16 CPU/GPU paths store activations (accumulation
precision inside an Apple kernel may differ slightly: this is a reference, not a bit-exact copy).
Every op type the evaluator does not know fails loudly with its name and the op that uses it.

`MilModel(package).predict({"input_ids": ..., "causal_mask": ...})` updates the model's states in
place like `MLModel.predict(..., state=...)` does; on macOS `targets.coreml_runtime` uses Core ML
itself through the same interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from llamaship.errors import RuntimeFailure

Array = np.ndarray


def _np_dtype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    dt = var.dtype
    if dt in (types.fp16,):
        return np.float16
    if dt in (types.fp32, types.fp64):
        return np.float32
    if dt == types.bool:
        return np.bool_
    if types.is_int(dt):
        return np.int32  # int8/int16/uint16/int32 values all fit; index math stays exact
    return None


def _f32(x: Array) -> Array:
    return np.asarray(x, dtype=np.float32)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ----- ops: each takes the op's named input values (None when an optional input is absent) -----

def _slice_by_index(x: Array, begin: Array, end: Array, stride: Array | None = None,
                    begin_mask: Array | None = None, end_mask: Array | None = None,
                    squeeze_mask: Array | None = None) -> Array:
    rank = x.ndim
    stride = np.ones(rank, int) if stride is None else stride
    begin_mask = np.zeros(rank, bool) if begin_mask is None else begin_mask
    end_mask = np.zeros(rank, bool) if end_mask is None else end_mask
    squeeze_mask = np.zeros(rank, bool) if squeeze_mask is None else squeeze_mask
    index: list[int | slice] = []
    for i in range(rank):
        if squeeze_mask[i]:  # MIL: a squeezed axis takes element `begin`; end and stride are ignored
            index.append(int(begin[i]))
            continue
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return x[tuple(index)]


def _slice_update(x: Array, update: Array, begin: Array, end: Array, stride: Array | None = None,
                  begin_mask: Array | None = None, end_mask: Array | None = None,
                  squeeze_mask: Array | None = None, in_place: bool = False) -> Array:
    out = x if in_place else np.array(x, copy=True)
    rank = x.ndim
    stride = np.ones(rank, int) if stride is None else stride
    begin_mask = np.zeros(rank, bool) if begin_mask is None else begin_mask
    end_mask = np.zeros(rank, bool) if end_mask is None else end_mask
    index = tuple(slice(None if begin_mask[i] else int(begin[i]), None if end_mask[i] else int(end[i]),
                        int(stride[i])) for i in range(rank))
    target_shape = out[index].shape
    out[index] = np.asarray(update).reshape(target_shape)
    return out


def _gather(x: Array, indices: Array, axis: int = 0, batch_dims: int = 0,
            validate_indices: bool = False) -> Array:
    if batch_dims:
        raise RuntimeFailure("MIL evaluator: gather with batch_dims is not supported")
    idx = np.asarray(indices).astype(np.int64)
    n = x.shape[_norm_axis(int(axis), x.ndim)]
    if np.any(idx >= n) or np.any(idx < -n):
        raise RuntimeFailure(f"MIL evaluator: gather index out of range (axis size {n}, max {idx.max()})")
    return np.take(x, idx, axis=int(axis))


def _linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    y = _f32(x) @ _f32(weight).T
    return y + _f32(bias) if bias is not None else y


def _matmul(x: Array, y: Array, transpose_x: bool = False, transpose_y: bool = False) -> Array:
    a, b = _f32(x), _f32(y)
    if transpose_x:
        a = np.swapaxes(a, -1, -2)
    if transpose_y:
        b = np.swapaxes(b, -1, -2)
    return a @ b


def _softmax(x: Array, axis: int = -1) -> Array:
    z = _f32(x)
    z = z - z.max(axis=int(axis), keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=int(axis), keepdims=True)


def _sdpa(query: Array, key: Array, value: Array, attn_mask: Array | None = None) -> Array:
    """iOS 18 scaled_dot_product_attention: softmax(q k^T / sqrt(d) + mask) v; a bool mask keeps
    True positions."""
    q, k, v = _f32(query), _f32(key), _f32(value)
    scores = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            scores = np.where(attn_mask, scores, -np.inf)
        else:
            scores = scores + _f32(attn_mask)
    return _softmax(scores, -1) @ v


def _blockwise_shift_scale(data: Array, scale: Array, offset: Array | None = None) -> Array:
    """output = scale * (data - offset), each scale/offset entry covering a block whose size along
    every axis is data.shape / scale.shape."""
    reps = []
    for d, s in zip(data.shape, scale.shape, strict=True):
        if d % s:
            raise RuntimeFailure(f"MIL evaluator: block shape {data.shape} / {scale.shape} is not integral")
        reps.append(d // s)

    def expand(a: Array) -> Array:
        for axis, r in enumerate(reps):
            if r > 1:
                a = np.repeat(a, r, axis=axis)
        return a

    q = _f32(data)
    if offset is not None:
        q = q - expand(_f32(offset))
    return expand(_f32(scale)) * q


def _reshape(x: Array, shape: Array) -> Array:
    shape = [int(s) for s in shape]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # MIL: 0 copies the input dim
    return x.reshape(shape)


def _reduce(fn: Callable[..., Array]) -> Callable[..., Array]:
    def op(x: Array, axes: Array | None = None, keep_dims: bool = False) -> Array:
        ax = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return fn(_f32(x), axis=ax, keepdims=bool(keep_dims))
    return op


def _concat(values: list[Array], axis: int, interleave: bool = False) -> Array:
    if interleave:
        raise RuntimeFailure("MIL evaluator: concat with interleave is not supported")
    return np.concatenate([np.atleast_1d(v) for v in values], axis=int(axis))


def _cast(x: Array, dtype: str) -> Array:
    table = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int32,
             "uint16": np.int32, "int8": np.int32, "uint8": np.int32, "bool": np.bool_}
    if dtype not in table:
        raise RuntimeFailure(f"MIL evaluator: cast to {dtype} is not supported")
    if table[dtype] is np.int32 and np.issubdtype(np.asarray(x).dtype, np.floating):
        return np.trunc(_f32(x)).astype(np.int32)
    return np.asarray(x).astype(table[dtype])


def _silu(x: Array) -> Array:
    z = _f32(x)
    return z / (1.0 + np.exp(-z))


def _rsqrt(x: Array, epsilon: float = 1e-12) -> Array:
    return 1.0 / np.sqrt(_f32(x) + float(epsilon))


OPS: dict[str, Callable[..., Any]] = {
    "add": lambda x, y: _f32(x) + _f32(y) if _is_float(x, y) else np.add(x, y),
    "sub": lambda x, y: _f32(x) - _f32(y) if _is_float(x, y) else np.subtract(x, y),
    "mul": lambda x, y: _f32(x) * _f32(y) if _is_float(x, y) else np.multiply(x, y),
    "real_div": lambda x, y: _f32(x) / _f32(y),
    "pow": lambda x, y: np.power(_f32(x), _f32(y)),
    "sqrt": lambda x: np.sqrt(_f32(x)),
    "abs": lambda x: np.abs(x),
    "minimum": lambda x, y: np.minimum(x, y),
    "maximum": lambda x, y: np.maximum(x, y),
    "clip": lambda x, alpha, beta: np.clip(_f32(x), float(alpha), float(beta)),
    "inverse": lambda x, epsilon=1e-4: 1.0 / (_f32(x) + float(epsilon)),  # MIL's default epsilon
    "rsqrt": _rsqrt,
    "exp": lambda x: np.exp(_f32(x)),
    "silu": _silu,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_f32(x))),
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "linear": _linear,
    "matmul": _matmul,
    "softmax": _softmax,
    "scaled_dot_product_attention": _sdpa,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "gather": _gather,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "concat": _concat,
    "reshape": _reshape,
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes))),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else tuple(int(a) for a in axes)),
    "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "shape": lambda x: np.array(np.shape(x), dtype=np.int32),
    "cast": _cast,
    "identity": lambda x: x,
    "select": lambda cond, a, b: np.where(np.asarray(cond, dtype=bool), a, b),
    "greater_equal": lambda x, y: np.greater_equal(x, y),
    "greater": lambda x, y: np.greater(x, y),
    "less_equal": lambda x, y: np.less_equal(x, y),
    "less": lambda x, y: np.less(x, y),
    "equal": lambda x, y: np.equal(x, y),
    "not_equal": lambda x, y: np.not_equal(x, y),
}


def _is_float(*xs: Any) -> bool:
    return any(np.issubdtype(np.asarray(x).dtype, np.floating) for x in xs)


DEFERRED_MIN_ELEMENTS = 4096  # weight blobs at least this large are read when used, not at load


@contextlib.contextmanager
def _deferred_blobs() -> Iterator[dict[int, tuple[Array, Callable[[], Array]]]]:
    """While coremltools' MIL-proto loader runs, each large weight blob becomes a zero-byte
    placeholder of its shape and dtype (a broadcast scalar), with a loader that reads it later.
    Why: the loader reads every blob and unpacks 4-bit values one byte each, about 2.5 bytes per
    stored byte, so an 8B program (4.8 GB stored) would need ~12 GB before the evaluator starts;
    the evaluator wants each weight once, in its own form (packed for ONNX Runtime's MatMulNBits,
    or dequantized), and can drop what it read. The loader keeps `id(placeholder)` -> (placeholder,
    read)."""
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.converters.mil.mil import types

    original = milproto._load_value
    deferred: dict[int, tuple[Array, Callable[[], Array]]] = {}

    def load_value(context: Any, value_spec: Any) -> Any:
        if value_spec.WhichOneof("value") == "blobFileValue" and value_spec.type.WhichOneof("type") == "tensorType":
            valuetype = milproto.proto_to_types(value_spec.type)
            if types.is_tensor(valuetype):
                shape = tuple(int(d) for d in valuetype.get_shape())
                if int(np.prod(shape)) >= DEFERRED_MIN_ELEMENTS:
                    dtype = types.nptype_from_builtin(valuetype.get_primitive())
                    placeholder = np.broadcast_to(np.zeros((), dtype), shape)
                    deferred[id(placeholder)] = (placeholder, partial(original, context, value_spec))
                    return placeholder
        return original(context, value_spec)

    milproto._load_value = load_value
    try:
        yield deferred
    finally:
        milproto._load_value = original


class Program:
    """The main function of a saved .mlpackage, as coremltools' MIL-proto loader reads it, with its
    large weights read only when `value(var)` asks for them (`_deferred_blobs`)."""

    def __init__(self, package: Path) -> None:
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto import load as milproto

        package = Path(package)
        if not (package / "Manifest.json").exists():
            raise RuntimeFailure(f"{package}: not an .mlpackage (no Manifest.json)")
        try:
            spec = ct.utils.load_spec(str(package))
            weights = package / "Data" / "com.apple.CoreML" / "weights"
            with _deferred_blobs() as deferred:
                prog = milproto.load(spec, spec.specificationVersion, file_weights_dir=str(weights))
        except Exception as exc:
            raise RuntimeFailure(f"{package}: cannot read the ML program: {exc}") from exc
        self.spec = spec
        self.function = prog.functions["main"]
        self.ops = list(self.function.operations)
        self._read: dict[str, Callable[[], Array]] = {}
        for op in self.ops:
            entry = deferred.get(id(op.outputs[0].val)) if op.op_type == "const" else None
            if entry is not None and entry[0] is op.outputs[0].val:
                self._read[op.outputs[0].name] = entry[1]
        self.state_names = [s.name for s in spec.description.state]
        self.output_names = [o.name for o in self.function.outputs]
        # slice_update may write into its input when every other reader of it has already run
        # (the KV-cache update: otherwise each token would copy the whole cache, per layer)
        position = {id(op): i for i, op in enumerate(self.ops)}
        self.in_place = {
            id(op) for i, op in enumerate(self.ops) if op.op_type == "slice_update"
            and all(position.get(id(c), len(self.ops)) < i for c in op.inputs["x"].child_ops if c is not op)
            and op.inputs["x"].name not in self.output_names
        }
        unknown = sorted({op.op_type for op in self.ops} - set(OPS) - {"const", "read_state", "coreml_update_state"})
        if unknown:
            raise RuntimeFailure(
                f"{package}: the MIL evaluator does not implement {unknown}; it refuses to guess their "
                "semantics (add them to targets/mil_eval.py with a test against PyTorch)"
            )

    def value(self, var: Any) -> Any:
        """The const's value: a deferred weight is read from the package now (a new array the
        caller owns; nothing keeps it here), anything else is coremltools' `var.val`."""
        read = self._read.get(var.name)
        return read() if read is not None else var.val

    def deferred(self, var: Any) -> bool:
        return var.name in self._read

    @staticmethod
    def consumers(var: Any) -> list[str]:
        """The op types that read `var` (a tied embedding/lm_head weight feeds gather and linear)."""
        return sorted({op.op_type for op in var.child_ops})


WEIGHT_CACHE_BYTES = 4 << 30  # dequantized weights kept between calls; beyond it, made per call


class MilModel:
    """Stateful execution of a Program: `predict(inputs)` -> outputs, states persist across calls
    until `reset_state()` (zeros, as `MLModel.make_state()` gives).

    `engine="plan"` (the default) runs the program compiled once into torch calls
    (`mil_plan.Plan`, ~10x faster); `engine="reference"` interprets it op by op with the NumPy ops
    above: the readable statement of what each op means, which the plan is tested against."""

    def __init__(self, package: Path, weight_cache_bytes: int = WEIGHT_CACHE_BYTES,
                 engine: str = "plan", check: Callable[[Program], None] | None = None) -> None:
        if engine not in ("plan", "reference"):
            raise ValueError(f"unknown MIL engine {engine!r}")
        self.program = Program(package)
        if check is not None:  # e.g. will it fit in memory: the program is read, its weights are not yet
            check(self.program)
        self.engine = engine
        self._weights: dict[str, Array] = {}  # dequantized / widened constants, made once
        self._cache_left = weight_cache_bytes
        self.states: dict[str, Any] = {}
        self._plan: Any = None
        if engine == "plan":
            from llamaship.runtime.mil_plan import Plan

            self._plan = Plan(self.program, weight_cache_bytes)
        self.reset_state()

    def reset_state(self) -> None:
        for name, var in self.program.function.inputs.items():
            if name in self.program.state_names:
                shape = tuple(int(d) for d in var.shape)
                zeros = np.zeros(shape, dtype=_np_dtype(var) or np.float16)
                if self._plan is not None:
                    import torch

                    self.states[name] = torch.from_numpy(zeros)
                else:
                    self.states[name] = zeros

    def predict(self, inputs: dict[str, Array]) -> dict[str, Array]:
        if self._plan is not None:
            return self._plan.run(inputs, self.states)
        env: dict[str, Any] = {}
        for name, var in self.program.function.inputs.items():
            if name in self.program.state_names:
                continue
            if name not in inputs:
                raise RuntimeFailure(f"MIL evaluator: missing input {name!r}")
            env[name] = np.asarray(inputs[name]).astype(_np_dtype(var))
        for op in self.program.ops:
            self._run(op, env)
        return {name: env[name] for name in self.program.output_names}

    def _value(self, var: Any, env: dict[str, Any]) -> Any:
        if isinstance(var, (list, tuple)):
            return [self._value(v, env) for v in var]
        if var.name in env:
            return env[var.name]
        if var.name in self._weights:
            return self._weights[var.name]
        if var.val is not None:
            val = self.program.value(var)
            if isinstance(val, np.ndarray) and val.dtype == np.float16 and val.size >= 1024:
                # fp16 weights widened (exactly), once while the cache budget lasts; ops compute in fp32
                val = self._keep(var.name, val.astype(np.float32))
            return val
        raise RuntimeFailure(f"MIL evaluator: value {var.name!r} used before it is computed")

    def _run(self, op: Any, env: dict[str, Any]) -> None:
        out = op.outputs[0]
        if op.op_type == "const":
            return  # read lazily through var.val
        if op.op_type == "constexpr_blockwise_shift_scale" and out.name in self._weights:
            env[out.name] = self._weights[out.name]
            return
        args = {k: self._value(v, env) for k, v in op.inputs.items()
                if not (op.op_type in ("read_state", "coreml_update_state") and k in ("input", "state"))}
        if op.op_type == "read_state":
            result: Any = self.states[op.inputs["input"].name]
        elif op.op_type == "coreml_update_state":
            state = op.inputs["state"].name
            self.states[state] = np.asarray(args["value"]).astype(self.states[state].dtype, copy=False)
            result = self.states[state]
        else:
            if id(op) in self.program.in_place:
                args["in_place"] = True
            try:
                result = OPS[op.op_type](**args)
            except RuntimeFailure:
                raise
            except Exception as exc:
                raise RuntimeFailure(f"MIL evaluator: {op.op_type} {out.name!r} failed: {exc}") from exc
        dtype = _np_dtype(out)
        result = np.asarray(result)
        if result.base is not None and op.op_type != "coreml_update_state":
            result = result.copy()  # no views escape: an in-place cache update must not change them
        if dtype is not None and result.dtype != dtype:
            result = result.astype(dtype)
        if op.op_type == "constexpr_blockwise_shift_scale":
            # dequantized once (rounded to the program's dtype), as Core ML does at load, while the
            # cache budget lasts: a 7B/8B program's weights would be 28-32 GB in fp32
            result = self._keep(out.name, result.astype(np.float32))
        env[out.name] = result

    def _keep(self, name: str, value: Array) -> Array:
        if value.nbytes <= self._cache_left:
            self._cache_left -= value.nbytes
            self._weights[name] = value
        return value


def load_program(package: Path) -> Program:
    return Program(package)
