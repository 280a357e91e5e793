"""Integer matrix products for the quantized layers, on PyTorch's own maintained operators.

PyTorch's older int8 path (``torch.ao.nn.quantized`` modules and the fbgemm ``torch.ops.quantized`` ops)
is deprecated and warned for removal; slimguard's layers run on maintained operators instead: ATen's, and
the oneDNN one that inductor's own int8 lowering calls:

| layer                                  | kernel                                            | activations       |
|----------------------------------------|---------------------------------------------------|-------------------|
| ``DynamicInt8Linear`` (default)        | ``torch._int_mm`` (int8 x int8 -> int32)          | int8, per row     |
| ``DynamicInt8Linear``, per tensor      | ``onednn::qlinear_pointwise`` (VNNI), scales and  | uint8, one scale  |
|                                        | bias fused; elsewhere ``torch._int_mm``           | per input         |
| ``QuantLinear`` (static int8)          | ``torch._int_mm`` + zero-point correction (int32) | uint8, calibrated |
| ``WeightOnlyLinear`` int8, per row     | ``torch._weight_int8pack_mm``                     | bfloat16          |
| ``WeightOnlyLinear`` 2..4 bit, grouped | ``torch._weight_int4pack_mm_for_cpu``             | bfloat16          |

When they run: on CPU, for float32 inputs, outside ``torch.jit`` tracing (ONNX export traces the
float / QDQ form, which ONNX Runtime fuses into its own int8 kernels). Elsewhere the layers compute the
same function in float (dequantized weights), equal up to float rounding. Dynamic int8 layers also multiply
in float when layer and batch are small (:data:`FLOAT_MAX_MACS`), and the short operator sequence serves
products up to :data:`SMALL_PRODUCT`: below a few million multiply-adds, what costs is the number of
operators called from Python (each a few microseconds), not the arithmetic.

The dynamic layers keep, per thread, the codes of the last input they quantized while that tensor lives
unchanged, so sibling layers reading one tensor (a transformer's query, key and value projections)
quantize it once: 125 instead of 185 quantizations per MiniLM forward.

Speed (``benchmarks/int8_kernels.py``, 2-core AMD EPYC with AVX-512 VNNI, a shared VM; paired rounds, 95%
intervals, glibc told to keep freed memory for every path alike; the JSON has every case). Against the
deprecated fbgemm operator at 2 threads: the recorded run, then the medians of two other runs of the same
code (one thread in brackets):

* per tensor, like for like with that operator (which had one 7-bit scale per input): 0.92x [0.89, 0.94] at
  384->384 (0.91x; 0.88-0.93x), 1.06x [1.03, 1.09] at 384->1536 (1.05-1.09x; 1.08-1.10x), 1.02x [0.98,
  1.06] at 1536->384 (1.00-1.03x; 1.08-1.13x); all-MiniLM-L6-v2 on 32 texts 1.01x [0.93, 1.03] against
  ``torch.ao.quantization.quantize_dynamic`` (0.99-1.01x; 0.97-1.00x), with embeddings closer to float32
  (cosine 0.982 against 0.948);
* per row (the default, the most faithful: MiniLM cosine 0.997): 0.79x [0.78, 0.80], 0.94x [0.93, 0.97],
  0.94x [0.92, 0.98] on the layers (0.83-0.84x, 0.93-0.96x, 0.93-0.98x; 0.80-0.84x, 1.03-1.04x,
  1.00-1.08x), MiniLM 0.95x [0.90, 0.99] (0.92-0.94x; 0.95-0.96x);
* the zoo's digits-mlp (64->300->100->10, batch 64: small layers, multiplied in float) 1.10-1.23x
  (0.88-1.04x);
* 2.6-4.2x float32 on the MiniLM layers; static int8 Linear 2.0-3.9x its former float emulation;
  weight-only int8 / int4 decode (1-8 rows) 1.9x float32 or more in every case and run.

Where the time goes: with the codes ready, the product alone is 1.03-1.46x faster than the removed
operator's whole call. Making the codes is 5-33% of the new time, most at 384->384, where the input is as
large as the output and the product is short. The removed operator quantized each block of the input while
packing it for the product; eager PyTorch makes the codes with separate operators, and no maintained one
fuses them (oneDNN takes codes and scales, it does not compute them; ``quantize_per_tensor`` makes the
deprecated quantized tensors). Running those operators on cache-sized blocks of rows
(:data:`QUANT_BLOCK_BYTES`) brings a block from memory once; what is left is about ten operator calls per
block and the per-row scales' passes over the output. ``torch.compile`` of the per-row layer (0.93-1.03x at
384->1536) does not close it either.

Allocation: the staging copy and the codes live in per-thread buffers (:class:`_Scratch`). With glibc's
defaults, a freed block of a few megabytes can go back to the system and come back as page faults on the
next call: hundreds per call of a 4096-row layer, a sixth of its time, varying with the process's history.
A serving process can keep freed memory with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296`` (or
jemalloc / tcmalloc), at the price of memory not handed back.

ONNX Runtime (:mod:`slimguard.runtime.onnx`) stays the fastest int8 path for transformers and convolutions.

Measured facts behind the choices (torch 2.13 CPU):

* The removed kernel quantizes the input while packing it and rescales inside the product. oneDNN's
  ``qlinear_pointwise`` does the rescaling (one input scale, a scale per weight channel, the bias) inside
  the product too; what is left outside is making the codes. Eager PyTorch has no single operator for that
  that is not deprecated (``quantize_per_tensor`` makes the deprecated quantized tensors): per tensor it
  takes ``aminmax``, then per block one fused multiply-add and an int32 -> int8 cast (the rounding trick
  below); per row, per block ``abs``, ``amax``, a multiply, ``round`` and a cast.
  Other paths measured (``benchmarks/int8_kernels.py --alternatives``, 2 threads, old time / alternative
  time at 384->384, 384->1536, 1536->384; single runs move by about 0.1): ``qlinear_pointwise`` with per-row
  uint8 codes and the row scales applied after 0.93 / 1.00 / 1.01x (paired against the shipped per-row
  path in four launches, with the same blocked codes: 0.96-0.99x, 0.95-0.98x, 1.01-1.03x; and it needs a
  second, packed copy of the weight), ``torch.compile`` of the per-row path 0.83 / 0.91 /
  1.01x (and it needs a C++ compiler and 1-3 s of compiling per shape). torchao 0.18's
  ``Int8DynamicActivationInt8WeightConfig`` in eager mode ran at 0.17x on 384->384 (one paired check).
* oneDNN's ``u8 x s8`` products need VNNI (or AMX): without it they pass through int16 and may saturate
  (oneDNN's guide to int8 computations), so :data:`ONEDNN_INT8` is false there and the per-tensor mode runs
  on ``_int_mm``. The packed weight is an opaque tensor that ``copy.deepcopy`` and pickle refuse; it lives
  in a :class:`PackCache`, which copies as empty and is rebuilt on first use.
* Rounding trick: adding ``1.5 * 2**23`` to a float below ``2**22`` in magnitude leaves the rounded integer
  (ties to even) in the low bits of its int32 view, and an int32 -> int8 cast keeps the low byte. The usual
  ``round`` then cast takes a pass more, and a float -> uint8 cast is not vectorised (3x slower than
  float -> int8), so uint8 codes come from the same trick with ``128`` added (zero point 128).
* Traps met there: ``qlinear_pointwise`` with signed int8 activations and ``_int_mm`` with a non-contiguous
  input run reference loops (10-20 s for one 4096 x 384 x 384 product); ``torch.aminmax`` along rows is
  about 10x slower than ``amax`` and ``amin``, so :func:`quantize_rows` takes ``amax`` of ``|x|`` (staged
  in cache, block by block) and :func:`fake_quantize_rows` the two.
* ``torch._int_mm`` on CPU accepts any ``M, K, N`` (its CUDA kernel wants ``M > 16`` and ``K, N``
  multiples of 8, which does not apply here), but returns wrong sums when ``K == 1``: :func:`int_mm` pads
  that case with a zero column (tests check odd shapes and ``K == 1``).
* ``_weight_int8pack_mm`` crashes the process (segmentation fault) when ``K`` is not a multiple of 16:
  :func:`pack_int8_rows` pads the weight with zero columns and the input is padded to match.
* The two weight-only kernels are vectorised for bfloat16 only; their float32 variants are reference
  loops 5-20x slower than float32 ``sgemm``. Activations are therefore cast to bfloat16 for the product
  (about 8 significant bits: output SQNR stays far above the weights' own rounding) and back.
* Both weight-only kernels beat float32 for a few rows but fall behind float32 ``sgemm`` for large
  batches (0.7-0.9x at 512 rows); above :data:`WEIGHT_ONLY_MAX_ROWS` rows a
  layer uses its dequantized float weight, cached on first use (as every batch did before). A model that
  only decodes never builds it.
* The int4 kernel needs the output count a multiple of 16 (extra rows are zero and sliced off), the input
  count a multiple of the group (zero columns, as the stored weight already has) and a group of 32, 64,
  128 or 256; other group sizes and 8-bit groups use the dequantized weight.
* Static int8 Conv2d stays on float emulation: ``im2col`` (``F.unfold``) has no int8 kernel, and unfolding
  float then multiplying with ``_int_mm`` measured 0.14x-0.49x the speed of the float convolution on the
  digits CNN shapes. ONNX Runtime's ``QLinearConv`` is the fast path for convolutions.

Integer kernels have no gradient: their outputs do not require grad. Attack a quantized model through
its fake-quant twin (:func:`slimguard.robust.fake_quant_twin`), which :func:`fake_quantize_rows` serves.

The three operators are registered with PyTorch's FLOP counter (``2 * M * K * N``; padded rows and columns
are counted, since they are computed), so :func:`slimguard.runtime.measure.count_macs` sees them.

Example:
    >>> y = int8_linear_dynamic(x, layer.weight_int8, layer.weight_scale, layer.bias)
"""

from __future__ import annotations

import abc
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from slimguard.core.cpu import cpu_flags

#: the weight-only kernels run for at most this many rows (tokens); more use the float weight
WEIGHT_ONLY_MAX_ROWS = 128
#: group sizes the int4 kernel takes
INT4_GROUPS = (32, 64, 128, 256)
_AMAX_FLOOR = 1e-30  # keeps 127 / amax finite for all-zero rows (their codes are 0 either way)
#: a dynamic int8 product is *small* when ``M * max(K, N)`` is at most this: there the number of operators,
#: each a few microseconds from Python, sets the time, so it runs the shortest sequence of them (``_int_mm``,
#: rescaled in one ``addcmul``); above it, the sequence that moves the least memory
SMALL_PRODUCT = 1 << 17
#: the largest scratch buffer (bytes) a thread keeps for quantizing dynamic int8 inputs (see :class:`_Scratch`)
SCRATCH_MAX_BYTES = 64 << 20
#: dynamic int8 inputs are quantized, and int32 products turned into the float output, in blocks of rows
#: whose float staging takes about this many bytes: each block comes from memory once and the passes after
#: the first run in the CPU's cache, where input-sized passes go to memory and back (paired in one process,
#: 2 threads, MiniLM layers: per row 8-18% faster, per tensor 2-12%; 2 MiB a little better than 0.5 and 1 MiB)
QUANT_BLOCK_BYTES = 1 << 21
#: at most this many blocks (each costs about ten operator calls from Python): very wide inputs take larger ones
MAX_BLOCKS = 256
#: a dynamic int8 layer with at most this many weights multiplies a batch of at most this many MACs
#: (``M * K * N``) in float32, with its dequantized weight (cached: 4 bytes per weight in memory, the file
#: keeps int8), and its input is not rounded: quantizing the input costs more there than the product saves
#: (1 thread, AVX-512: float32 on par with the removed fbgemm kernel up to about 2M MACs, the int8 path 1.5-2x
#: slower than both)
FLOAT_MAX_WEIGHTS = 1 << 16
FLOAT_MAX_MACS = 1 << 21


def float_product(x: torch.Tensor, in_features: int, out_features: int) -> bool:
    """True when a dynamic int8 layer multiplies ``x`` in float (see :data:`FLOAT_MAX_MACS`): a small layer and
    a small batch, or an input the integer kernels do not serve (:func:`use_int_kernels`)."""
    return not use_int_kernels(x) or small_in_float(x, in_features, out_features)


def small_in_float(x: torch.Tensor, in_features: int, out_features: int) -> bool:
    """True for a layer and batch small enough to multiply in float (:data:`FLOAT_MAX_MACS`); never while
    traced (``torch.export``, ``torch.compile``): one program serves every batch size."""
    weights = in_features * out_features
    return (weights <= FLOAT_MAX_WEIGHTS and not torch.compiler.is_compiling()
            and (x.numel() // max(in_features, 1)) * weights <= FLOAT_MAX_MACS)


def use_int_kernels(x: torch.Tensor) -> bool:
    """True when the integer kernels serve the input ``x`` (CPU, float32, not traced for export)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.jit.is_tracing()


class Prepacked(abc.ABC):
    """Mixin of layers whose kernel wants the weight in its own layout, built lazily (never stored).

    :func:`prepack_all` builds every such layout at once; it runs after each artifact load, so that a
    loaded model's first call is not slower than the rest and a layout problem shows at load time.
    """

    @abc.abstractmethod
    def prepack(self) -> None:
        """Build (or rebuild) this layer's kernel layout from its stored tensors."""


def prepack_all(model: torch.nn.Module) -> int:
    """Build the kernel layout of every :class:`Prepacked` layer of ``model``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, Prepacked)]
    for m in layers:
        m.prepack()
    return len(layers)


class PackCache:
    """A value derived from some tensors (a packed weight), rebuilt when any of them is replaced (load,
    ``.to()``) or changed in place. It holds weak references only, so it never keeps old tensors alive;
    it is not part of the module's state, so artifacts do not change."""

    def __init__(self) -> None:
        self._key: tuple[tuple[Any, int], ...] | None = None
        self._value: Any = None

    def get(self, sources: tuple[torch.Tensor, ...], build: Callable[[], Any]) -> Any:
        key = self._key
        if key is not None and len(key) == len(sources):
            for (ref, version), t in zip(key, sources, strict=True):  # a loop: this runs on every call
                if ref() is not t or version != t._version:
                    break
            else:
                return self._value
        self._value = build()
        self._key = tuple((weakref.ref(t), t._version) for t in sources)
        return self._value

    @property
    def ready(self) -> bool:
        """True once a value has been built (it may still be rebuilt when its sources change)."""
        return self._key is not None

    def clear(self) -> None:
        self._key = self._value = None

    # A copy starts empty and rebuilds on first use: a kernel layout (oneDNN's packed weight is an opaque
    # tensor) need not be copyable, and a copied module's tensors are new objects anyway.
    def __deepcopy__(self, memo: dict[int, Any]) -> PackCache:
        return PackCache()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) int8 @ b (K, N) int8 -> (M, N) int32`` through ``torch._int_mm``, exact.

    The CPU kernel (torch 2.13) returns wrong sums for ``K == 1``; a zero column makes it ``K == 2``.
    """
    if a.shape[1] == 1:
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 0, 0, 1))
    return torch._int_mm(a, b)


# ---- dynamic int8 -------------------------------------------------------------------------------------
def _row_qparams(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv, scale)``, each ``(M, 1)``: symmetric int8 per row, ``scale = max|x_row| / 127``."""
    # two reductions read x twice but allocate nothing of its size (x.abs() would), which is faster here
    amax = torch.maximum(x2d.amax(1, keepdim=True), x2d.amin(1, keepdim=True).neg_()).clamp_min_(_AMAX_FLOOR)
    return 127.0 / amax, amax / 127.0


def _finish(acc: torch.Tensor, col_scale: Any, bias: torch.Tensor | None, row_scale: torch.Tensor | None = None,
            col_offset: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 output of the int32 products ``acc (M, N)``, written over them (same element size, element by
    element: no output-sized allocation and its page faults): ``((acc + col_offset) * row_scale) * col_scale +
    bias``, each where given (``row_scale (M, 1)``; ``col_scale`` ``(N,)``, 0-d or a number). A block of rows
    at a time (:func:`_row_blocks`): each block comes from memory once and its later passes run in cache
    (per row at 384->1536, 0.92x -> 0.95-0.97x the removed kernel). A traced program takes one block."""
    y = acc.view(torch.float32)
    b = None if bias is None else bias.detach()
    for rows in [slice(None)] if torch.compiler.is_compiling() else _row_blocks(acc):
        yb = y[rows]
        yb.copy_(acc[rows] if col_offset is None else acc[rows].add_(col_offset))
        if row_scale is not None:
            yb.mul_(row_scale[rows])
        if b is None:
            yb.mul_(col_scale)
        else:
            torch.addcmul(b, yb, col_scale, out=yb)
    return y


def quantize_rows(x2d: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``x2d (M, K)`` and the row scales ``(M, 1)``: ``x ~= q * scale``.

    ``|x * 127 / max|x||`` never exceeds 127 (up to float rounding, which rounds back to 127), so no clamp
    is needed. Large inputs write their codes into ``out`` when given (an int8 tensor shaped like ``x2d``).
    """
    if torch.compiler.is_compiling():  # one sequence for every size: no loop over blocks of a symbolic count
        inv, scale = _row_qparams(x2d)
        return torch.mul(x2d, inv).round_().to(torch.int8), scale
    if x2d.numel() <= SMALL_PRODUCT:  # fewer operators
        scale = x2d.abs().amax(1, keepdim=True).clamp_min_(_AMAX_FLOOR).div_(127.0)
        return torch.div(x2d, scale).round_().to(torch.int8), scale
    codes = torch.empty(x2d.shape, dtype=torch.int8) if out is None else out
    amax = torch.empty(x2d.shape[0], 1)
    for rows in _row_blocks(x2d):  # a block comes from memory once; its |x|, range and codes are made in cache
        xb, ab = x2d[rows], amax[rows]
        staged = _SCRATCH.take("staged", xb, torch.float32)
        torch.amax(torch.abs(xb, out=staged), 1, keepdim=True, out=ab).clamp_min_(_AMAX_FLOOR)
        codes[rows].copy_(torch.mul(xb, 127.0 / ab, out=staged).round_())
    return codes, amax.div_(127.0)


def _row_blocks(x2d: torch.Tensor) -> list[slice]:
    """Ranges of rows of ``x2d``, of even sizes, whose float32 staging takes about :data:`QUANT_BLOCK_BYTES`
    (one row at least): 4096 rows of 384 make three blocks, not three and a block of one row."""
    m, k = x2d.shape
    count = min(max(1, round(m / max(1, QUANT_BLOCK_BYTES // (4 * max(k, 1))))), MAX_BLOCKS)
    step = max(1, -(-m // count))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)]


def _small(x2d: torch.Tensor, n: int) -> bool:
    """A small product (:data:`SMALL_PRODUCT`); never while traced, so a traced program serves every size."""
    return not torch.compiler.is_compiling() and x2d.shape[0] * max(x2d.shape[1], n) <= SMALL_PRODUCT


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """What :func:`int8_linear_dynamic` does to its input, in float: each row (last dimension) rounded to
    its own int8 grid; the gradient passes straight through (the range covers the row, nothing clips)."""
    with torch.no_grad():
        inv, scale = _row_qparams(x.detach().reshape(-1, x.shape[-1]))
        xq = (torch.mul(x.detach().reshape(-1, x.shape[-1]), inv).round_() * scale).reshape(x.shape)
    return x + (xq - x).detach()


def _as_rows(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x (*, K)`` as detached rows ``(M, K)``, and the ``(*, N)`` output of an empty batch (None otherwise)."""
    x2d = x.detach().reshape(-1, x.shape[-1])
    return x2d, (x.new_zeros(*x.shape[:-1], n) if x2d.shape[0] == 0 else None)


def _rescale(acc: torch.Tensor, scale: Any, weight_scale: torch.Tensor, bias: torch.Tensor | None,
             small: bool) -> torch.Tensor:
    """The int32 products ``acc (M, N)`` times the input's scale (per row ``(M, 1)``, or one: a number or a
    0-d tensor) and the weight's ``(N,)``, plus the bias, in float32."""
    b = None if bias is None else bias.detach()
    if small:  # two operators, the int32 read as float on the fly
        scales = scale * weight_scale
        return acc * scales if b is None else torch.addcmul(b, acc, scales)
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        return _finish(acc, weight_scale, bias, row_scale=scale)
    return _finish(acc, weight_scale * scale, bias)


def int8_linear_dynamic(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight_int8 * weight_scale).T + bias`` with ``x`` quantized per row to int8 on the fly.

    Shape:
        ``x (*, K)``, ``weight_int8 (N, K)`` int8, ``weight_scale (N,)``, ``bias (N,)`` -> ``(*, N)``.
    """
    n = weight_int8.shape[0]
    x2d, empty = _as_rows(x, n)
    if empty is not None:
        return empty
    q, row_scale = _LAST.get(x, "row", lambda: quantize_rows(x2d, _SCRATCH.codes(x2d)))
    y = _rescale(int_mm(q, weight_int8.t()), row_scale, weight_scale, bias, _small(x2d, n))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


class _LastInput(threading.local):
    """The codes of the last input quantized on this thread, kept while that input lives unchanged.

    Sibling layers that read the same tensor (a transformer's query, key and value projections) then
    quantize it once. A hit needs the very same tensor object (a weak reference: a freed input never
    matches a new one at the same address), its version unchanged (no in-place write since) and the
    same quantization mode. Inference tensors (``torch.inference_mode``) keep no version, and code being
    compiled by ``torch.compile`` should not hold Python state: both always build.
    """

    def __init__(self) -> None:
        self.key: tuple[weakref.ref[torch.Tensor], int, str] | None = None
        self.value: Any = None

    def get(self, x: torch.Tensor, mode: str, build: Callable[[], Any]) -> Any:
        if x.is_inference() or torch.compiler.is_compiling():
            return build()
        key = self.key
        if key is not None and key[0]() is x and key[1] == x._version and key[2] == mode:
            return self.value
        self.key, self.value = None, None  # drop the old codes before building the new ones
        value = build()
        self.key, self.value = (weakref.ref(x), x._version, mode), value
        return value


_LAST = _LastInput()


class _Scratch(threading.local):
    """Per-thread buffers for the intermediates of quantizing an input: the float staging of one block of
    rows (:data:`QUANT_BLOCK_BYTES`) and the codes.

    Allocating them on every call costs more than the passes that fill them: a freed large block goes back
    to the operating system, and the next one comes back as page faults (350-625 per call of a 4096 x 384
    input at 2 threads, up to a sixth of its time, in numbers that vary with the process's history; the
    removed fbgemm kernel paid the same for its own buffers). A buffer grows to the largest input seen, up
    to :data:`SCRATCH_MAX_BYTES`; larger inputs and traced programs (``torch.compile``, ``torch.export``)
    allocate as usual.

    The staging buffer lives within one call. The codes buffer (:meth:`codes`) holds the codes that
    :class:`_LastInput` keeps, and only those: it forgets them before building the next ones, so the codes
    it hands to sibling layers are always current.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``dtype`` buffer shaped like ``like``, overwritten by the next take of ``name``."""
        n = like.numel()
        if torch.compiler.is_compiling() or n * dtype.itemsize > SCRATCH_MAX_BYTES:
            return torch.empty(like.shape, dtype=dtype)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(like.shape)

    def codes(self, like: torch.Tensor) -> torch.Tensor:
        """The buffer for the int8 codes that :data:`_LAST` keeps (see above)."""
        return self.take("codes", like, torch.int8)


_SCRATCH = _Scratch()


# ---- dynamic int8, one scale per tensor ---------------------------------------------------------------
# Adding 1.5 * 2**23 to a float of magnitude below 2**22 rounds it to an integer (ties to even) that sits in
# the low bits of the sum's int32 view; an int32 -> int8 cast keeps the low byte. One pass and one cast make
# the codes, where ``round`` and a float -> int8 cast took three passes (a float -> uint8 cast is not
# vectorised at all: 3x slower than to int8).
_MAGIC = 12582912.0
_MAGIC_S8 = torch.tensor(_MAGIC)  # low byte: the signed code
_MAGIC_U8 = torch.tensor(_MAGIC + 128.0)  # low byte: the code + 128 (zero point 128)


def _tensor_scale(x2d: torch.Tensor) -> float:
    """``max|x| / 127`` over the whole tensor (one reduction pass; at least a tiny positive number)."""
    lo, hi = torch.aminmax(x2d)
    return max(float(hi), -float(lo), _AMAX_FLOOR) / 127.0


def _quantize_tensor(x2d: torch.Tensor, magic: torch.Tensor,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """int8 codes of ``x2d`` on one symmetric grid (as the low byte of ``magic`` + code) and its scale: a
    float, or, in a traced program (which cannot read a tensor's value), a 0-d tensor. The codes go into
    ``out`` when given (outside traced programs)."""
    if torch.compiler.is_compiling():
        lo, hi = torch.aminmax(x2d)
        scale = torch.maximum(hi, lo.neg()).clamp_min(_AMAX_FLOOR) / 127.0
        return torch.addcmul(magic, x2d, scale.reciprocal()).view(torch.int32).to(torch.int8), scale
    s = _tensor_scale(x2d)
    codes = torch.empty(x2d.shape, dtype=torch.int8) if out is None else out
    for rows in _row_blocks(x2d):
        staged = torch.add(magic, x2d[rows], alpha=1.0 / s, out=_SCRATCH.take("staged", x2d[rows], torch.float32))
        codes[rows].copy_(staged.view(torch.int32))
    return codes, s


def fake_quantize_tensor(x: torch.Tensor) -> torch.Tensor:
    """What :func:`int8_linear_dynamic_tensor` does to its input, in float: the whole tensor rounded to one
    symmetric int8 grid, ``max|x| / 127``; the gradient passes straight through (nothing clips)."""
    with torch.no_grad():
        scale = max(float(x.detach().abs().amax()), _AMAX_FLOOR) / 127.0 if x.numel() else 1.0
        xq = torch.round(x.detach() / scale) * scale
    return x + (xq - x).detach()


def _has_vnni() -> bool:
    """x86 with VNNI (or AMX): oneDNN multiplies uint8 x int8 in int32 there. Without it, ``u8 x s8`` products
    pass through int16 and may saturate (oneDNN's guide to int8 computations), so :func:`_int_mm` serves."""
    flags = cpu_flags() or frozenset()
    return torch.backends.mkldnn.is_available() and bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


#: True when :func:`int8_linear_dynamic_tensor` runs on oneDNN's ``qlinear_pointwise`` (else ``_int_mm``)
ONEDNN_INT8 = _has_vnni()
_QLINEAR: Any = torch.ops.onednn.qlinear_pointwise.default if ONEDNN_INT8 else None


class OnednnWeight(NamedTuple):
    """A dynamic int8 weight in oneDNN's layout (an opaque tensor: rebuilt after a load, never stored)."""

    packed: torch.Tensor
    zero_points: torch.Tensor  # (N,) int64 zeros: the weight is symmetric


def pack_onednn(weight_int8: torch.Tensor) -> OnednnWeight | None:
    """``weight_int8 (N, K)`` packed for ``onednn::qlinear_pointwise``, or None where :data:`ONEDNN_INT8`
    is false (the ``_int_mm`` path needs no packing)."""
    if not ONEDNN_INT8:
        return None
    w = weight_int8.detach().contiguous()
    return OnednnWeight(torch.ops.onednn.qlinear_prepack(w, None), torch.zeros(w.shape[0], dtype=torch.long))


def int8_linear_dynamic_tensor(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor | None, packed: OnednnWeight | None) -> torch.Tensor:
    """As :func:`int8_linear_dynamic`, with one symmetric int8 scale for the whole input, as the deprecated
    fbgemm operator had (it used 7 bits; here 8).

    One scale lets the kernel apply every scale and the bias inside the product: with ``packed`` (see
    :func:`pack_onednn`), oneDNN's ``qlinear_pointwise`` takes the uint8 codes and writes the float output in
    one call. Without it, and for small products (:data:`SMALL_PRODUCT`: oneDNN's call costs about 25 us
    more than ``_int_mm``'s), ``torch._int_mm`` and one rescaling pass. Shapes as there.
    """
    n = weight_int8.shape[0]
    x2d, empty = _as_rows(x, n)
    if empty is not None:
        return empty
    small = _small(x2d, n)
    if packed is not None and not small:
        q, scale = _LAST.get(x, "tensor-u8", lambda: _quantize_tensor(x2d, _MAGIC_U8, _SCRATCH.codes(x2d)))
        b = None if bias is None else bias.detach()
        y = _QLINEAR(q.view(torch.uint8), scale, 128, packed.packed, weight_scale, packed.zero_points, b, 1.0, 0,
                     torch.float32, "none", [], "")
    else:
        q, scale = _LAST.get(x, "tensor-s8", lambda: _quantize_tensor(x2d, _MAGIC_S8, _SCRATCH.codes(x2d)))
        y = _rescale(int_mm(q, weight_int8.t()), scale, weight_scale, bias, small)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


# ---- static int8 --------------------------------------------------------------------------------------
def weight_row_sums(weight_int8: torch.Tensor) -> torch.Tensor:
    """``sum_k W[n, k]`` as int32 ``(N,)``: the zero-point correction of :func:`int8_linear_static`."""
    return weight_int8.sum(1, dtype=torch.int32)


def quantize_static_input(x2d: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zero_point, 0, 255)``, stored minus 128 as int8 (the same
    rounding as ``torch.fake_quantize_per_tensor_affine``: ``x * (1 / scale)``, ties to even)."""
    shift = zero_point.reshape(()).to(torch.int32) - 128
    return torch.mul(x2d, 1.0 / scale.reshape(())).round_().add_(shift).clamp_(-128, 127).to(torch.int8)


def int8_linear_static(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                       weight_rows: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor,
                       input_zero_point: torch.Tensor) -> torch.Tensor:
    """The static int8 product in integers: ``(q_x - z) @ W.T`` accumulated exactly in int32, then scaled.

    ``q_x - z`` spans [-255, 255], too wide for int8, so the uint8 codes go in shifted by -128 and the
    shift comes back as ``(128 - z) * sum_k W[n, k]`` (``weight_rows``, from :func:`weight_row_sums`).

    Shape:
        ``x (*, K)``, ``weight_int8 (N, K)``, ``weight_scale (N,)``, ``weight_rows (N,)`` int32 -> ``(*, N)``.
    """
    k, n = x.shape[-1], weight_int8.shape[0]
    q = quantize_static_input(x.detach().reshape(-1, k), input_scale, input_zero_point)
    acc = int_mm(q, weight_int8.t())
    offset = weight_rows * (128 - input_zero_point.reshape(()).to(torch.int32))
    y = _finish(acc, input_scale.reshape(()) * weight_scale, bias, col_offset=offset)
    return y.reshape(*x.shape[:-1], n)


# ---- weight-only int8 / int4 --------------------------------------------------------------------------
class Int8Rows(NamedTuple):
    """A weight-only int8 weight packed for ``_weight_int8pack_mm``: ``W = weight * scales + offsets``."""

    weight: torch.Tensor  # (N, K padded to 16) int8, zero in the padding
    scales: torch.Tensor  # (N,) bfloat16
    offsets: torch.Tensor | None  # (N,) float32 per-row offsets of asymmetric codes, None when symmetric


def pack_int8_rows(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Int8Rows:
    """Pack unsigned codes ``(N, K)`` with one scale and zero per row (``W = (codes - zero) * scale``).

    ``K`` is padded with zero columns to a multiple of 16 (the kernel crashes otherwise).
    """
    n, k = codes.shape
    weight = torch.zeros(n, -(-k // 16) * 16, dtype=torch.int8)
    weight[:, :k] = (codes.to(torch.int16) - 128).to(torch.int8)
    s, z = scales.reshape(-1).float(), zeros.reshape(-1).float()
    offsets = None if bool((z == 128).all()) else (128 - z) * s
    return Int8Rows(weight, s.to(torch.bfloat16), offsets)


def int8_weight_only_linear(x: torch.Tensor, packed: Int8Rows, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with the int8 weight of :func:`pack_int8_rows` (bfloat16 activations)."""
    (n, k_pad), k = packed.weight.shape, x.shape[-1]
    x2 = x.detach().reshape(-1, k)
    xb = x2.to(torch.bfloat16)
    if k_pad > k:
        xb = F.pad(xb, (0, k_pad - k))
    y = torch._weight_int8pack_mm(xb, packed.weight, packed.scales).float()
    if packed.offsets is not None:
        y.add_(x2.sum(1, keepdim=True) * packed.offsets)
    if bias is not None:
        y.add_(bias.detach())
    return y.reshape(*x.shape[:-1], n)


class Int4Pack(NamedTuple):
    """A 2..4-bit grouped weight packed for ``_weight_int4pack_mm_for_cpu``."""

    weight: torch.Tensor  # (N padded to 16, K padded / 2) uint8, the kernel's layout
    scale_zeros: torch.Tensor  # (groups, N padded, 2) bfloat16: W = (code - 8) * scale + zero
    group: int
    out_features: int
    in_padded: int


def int4_unsupported(group: int) -> str | None:
    """Why the int4 kernel cannot take this group size, or None."""
    return None if group in INT4_GROUPS else f"group {group} is not one of {INT4_GROUPS}"


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> Int4Pack:
    """Pack unsigned codes ``(N, K)`` (0..15; ``K`` a multiple of ``group``) with per-group ``scales`` and
    ``zeros`` ``(N, K // group)``, where ``W = (codes - zeros) * scales``.

    The kernel dequantizes ``(code - 8) * scale + zero``. When every zero point is an integer and the codes
    shifted by ``8 - zeros`` stay within 0..15 (symmetric codes of any width; asymmetric codes of 3 bits or
    fewer), the codes are shifted and the kernel's zero is exactly 0; otherwise its zero is
    ``(8 - zeros) * scales``, rounded to bfloat16 with the scales.
    """
    n, k = codes.shape
    n_pad = -(-n // 16) * 16
    shift = 8 - zeros.float()
    codes = codes.to(torch.int32)
    zero_term = shift * scales
    if torch.equal(shift, shift.round()):
        shifted = codes + shift.to(torch.int32).repeat_interleave(group, 1)
        if int(shifted.min()) >= 0 and int(shifted.max()) <= 15:
            codes, zero_term = shifted, torch.zeros_like(scales)
    full = torch.full((n_pad, k), 8, dtype=torch.int32)
    full[:n] = codes
    sz = torch.zeros(k // group, n_pad, 2)
    sz[:, :n, 0] = scales.t()
    sz[:, :n, 1] = zero_term.t()
    weight = torch._convert_weight_to_int4pack_for_cpu(full, 1)
    return Int4Pack(weight, sz.to(torch.bfloat16).contiguous(), group, n, k)


def int4_weight_only_linear(x: torch.Tensor, packed: Int4Pack, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with the weight of :func:`pack_int4` (bfloat16 activations)."""
    k = x.shape[-1]
    xb = x.detach().reshape(-1, k).to(torch.bfloat16)
    if packed.in_padded > k:
        xb = F.pad(xb, (0, packed.in_padded - k))
    y = torch._weight_int4pack_mm_for_cpu(xb, packed.weight, packed.group, packed.scale_zeros)
    y = y[:, : packed.out_features].float()
    if bias is not None:
        y.add_(bias.detach())
    return y.reshape(*x.shape[:-1], packed.out_features)


# ---- MACs ---------------------------------------------------------------------------------------------
def _mkn_flops(x: torch.Tensor, *args: Any, out_val: torch.Tensor | None = None, **kwargs: Any) -> int:
    """``2 * M * K * N`` for ``x (M, K)`` and an output ``(M, N)``."""
    assert out_val is not None  # the FLOP counter passes the output (get_raw=True)
    return 2 * x.shape[0] * x.shape[1] * out_val.shape[-1]


def _register_flops() -> None:
    """Count the integer products as ``2 * M * K * N`` FLOPs in PyTorch's FLOP counter (MACs = FLOPs / 2)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    ops = [aten._int_mm, aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu]
    if ONEDNN_INT8:
        ops.append(torch.ops.onednn.qlinear_pointwise)
    for op in ops:
        if op not in flop_registry and op.default not in flop_registry:  # a later torch may count them itself
            register_flop_formula(op, get_raw=True)(_mkn_flops)


_register_flops()


def _prepack_on_load(model: torch.nn.Module, _manifest: dict[str, Any]) -> None:
    prepack_all(model)


def _register_load_hook() -> None:
    from slimguard.core.modules import register_load_hook

    register_load_hook(_prepack_on_load)


_register_load_hook()
