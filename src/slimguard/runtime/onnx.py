"""ONNX export and ONNX Runtime (ORT) execution, including int8.

How to use it:

* **Any model** (float, or quantized by :mod:`slimguard.quantize`):
  ``path = export_onnx(model, example_inputs, "m.onnx")``; slimguard's quantized layers export as
  QuantizeLinear/DequantizeLinear (QDQ) pairs, which ORT fuses into int8 kernels (QLinearConv, ...).
* **Dynamic int8** (``int8-dynamic``) exports as ``DynamicQuantizeLinear`` + ``MatMulInteger`` (ORT fuses
  them into ``DynamicQuantizeMatMul``); layers whose int8 ONNX cannot keep (low-bit weight-only) are
  refused by name (:data:`UNEXPORTABLE`), never written as float.
* **torch.export**: ``program = export_program(model, example_inputs)`` gives the ``ExportedProgram`` of
  the model as PyTorch runs it (int8 kernels included), for ExecuTorch or AOTInductor.
* **Run it like a torch module**: ``ort_model = OrtModel(path, num_threads=2)``; ``ort_model(x)``
  takes and returns torch tensors (keyword arguments by ONNX input name work too). It is an
  ``nn.Module`` without parameters, so :func:`slimguard.evaluate`, ``latency`` and friends accept it.
* **Check that int8 kernels ran**: ``check_int8_kernels(ort_model)`` counts int8 operators in the graph
  ORT actually optimized and warns when there are none.
* **Sentence embedders** (``sg.models.load_model("minilm")``): ``export_embedder(model, "e.onnx")``
  exports ``(input_ids, attention_mask) -> embedding`` with dynamic batch and length;
  ``quantize_onnx_dynamic("e.onnx", "e-int8.onnx", optimize=False)`` applies slimguard's int8 settings
  (per-channel int8 weights, chosen layers kept in float; ``optimize=True`` adds ORT's offline
  transformer fusions); or all at once:
  ``ort_int8 = embedder_int8(model, "out_dir")`` then ``ort_int8(**model.tokenize(texts))``.

Example:
    >>> path = export_onnx(model, torch.rand(1, 1, 32, 32), "m.onnx")
    >>> ort_model = OrtModel(path, num_threads=2)
    >>> check_int8_kernels(ort_model)["int8_ops"]
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ModelError, require
from slimguard.core.torch_utils import eval_mode

log = logging.getLogger(__name__)

#: ONNX operators that execute with integer arithmetic on ORT's CPU provider.
INT8_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QGemm", "QAttention", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid", "DynamicQuantizeLSTM",
    "QEmbedLayerNormalization", "MatMulNBits", "NhwcQLinearConv",
})
PathLike = str | os.PathLike[str]


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, list):
        return tuple(inputs)
    return (inputs,)


def export_onnx(model: nn.Module, example_inputs: Any, path: PathLike, *,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] = ("output",),
                dynamic_batch: bool = True, dynamic_axes: dict[str, dict[int, str]] | None = None,
                opset: int = 17, progress: bool = True) -> Path:
    """Export ``model`` to an ONNX file (TorchScript-based exporter, constant folding on), with a progress
    bar over its stages (trace and write, then int8 requantization when there are dynamic int8 layers).

    Quantized slimguard layers trace as ``fake_quantize`` ops and become QuantizeLinear /
    DequantizeLinear (QDQ) pairs; int8 weights are stored as int8 initializers. Dynamic int8 layers
    (``int8-dynamic``) become ``DynamicQuantizeLinear`` + ``MatMulInteger`` (ORT's dynamic quantizer applied to
    their nodes of the exported graph). Layers whose arithmetic ONNX would not keep (:data:`UNEXPORTABLE`)
    are refused with a :class:`ModelError` naming one of them.

    The exporter is TorchScript's (``torch.onnx.export(..., dynamo=False)``). For a graph without ONNX,
    :func:`export_program` gives the ``torch.export`` program of the same model.

    Args:
        model: the model; its ``training`` flag is restored afterwards.
        example_inputs: a tensor, or a tuple of tensors (positional inputs).
        path: where to write the ``.onnx`` file.
        input_names: ONNX input names (default ``input``, ``input_1``, ...).
        output_names: ONNX output names (default ``("output",)``).
        dynamic_batch: make dimension 0 of every input and output dynamic (default True).
        dynamic_axes: explicit dynamic axes (overrides ``dynamic_batch``).
        opset: ONNX opset (default 17).
    """
    refused = unexportable_layers(model)
    if refused:
        name, why = next(iter(refused.items()))
        raise ModelError(f"ONNX export cannot keep what {len(refused)} layer(s) compute, e.g. {name}: {why}; "
                         "export the model before that step, or use int8-static / int8-dynamic, which export as "
                         "int8")
    dynamic_int8 = dynamic_int8_layers(model)
    args = _as_tuple(example_inputs)
    names = list(input_names) if input_names else (["input"] + [f"input_{i}" for i in range(1, len(args))])
    if dynamic_axes is None and dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in [*names, *output_names]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from slimguard.ui import progress as bar

    with bar(1 + bool(dynamic_int8), "ONNX export", enabled=progress) as task:
        with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, args, str(path), dynamo=False, input_names=names,
                                  output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=opset,
                                  do_constant_folding=True)
            except Exception as exc:  # the exporter raises many types; name the model and the cause
                raise ModelError(f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        task.advance(1, info="traced")
        if dynamic_int8:
            _requantize_dynamic(path, dynamic_int8)
            task.advance(1, info="dynamic int8 nodes")
    return path


def export_program(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = True) -> Any:
    """The ``torch.export`` program of ``model`` (``torch.export.export``, strict=False), for runtimes that
    take an ``ExportedProgram`` (ExecuTorch, AOTInductor) instead of ONNX.

    Compressed models export as they run in PyTorch: pruned layers at their new sizes, dynamic int8 layers
    as ``torch._int_mm`` on int8 tensors, static int8 as quantize/dequantize ops. Dimension 0 of every input
    is dynamic when ``dynamic_batch`` (example batch of at least 2).

    Example:
        >>> program = export_program(model, torch.rand(2, 1, 32, 32))
        >>> program.module()(torch.rand(5, 1, 32, 32)).shape
    """
    args = _as_tuple(example_inputs)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        shapes = tuple({0: batch} if torch.is_tensor(a) else None for a in args)
    with eval_mode(model), torch.no_grad():
        try:
            return torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # torch.export raises many types; name the model and the cause
            raise ModelError(f"torch.export of {type(model).__name__} failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


#: Layer classes (registered names, :mod:`slimguard.core.modules`) whose arithmetic the ONNX graph keeps
#: only as float, with why; :func:`export_onnx` refuses them instead of writing a model that is not theirs.
UNEXPORTABLE = {
    "slimguard.WeightOnlyLinear": "low-bit weight-only layers have no ONNX Runtime kernel here (they would "
                                  "export as float)",
    "slimguard.WeightOnlyConv2d": "low-bit weight-only layers have no ONNX Runtime kernel here (they would "
                                  "export as float)",
    "slimguard.WeightOnlyEmbedding": "low-bit weight-only embeddings have no ONNX Runtime kernel here (they "
                                     "would export as float)",
}
DYNAMIC_INT8 = "slimguard.DynamicInt8Linear"


def _registered_name(module: nn.Module) -> str | None:
    from slimguard.core.modules import CLASSES

    for name, cls in CLASSES.items():
        if type(module) is cls:
            return str(name)
    return None


def unexportable_layers(model: nn.Module) -> dict[str, str]:
    """Qualified names of the layers :func:`export_onnx` refuses, with the reason."""
    out = {}
    for name, module in model.named_modules():
        why = UNEXPORTABLE.get(_registered_name(module) or "")
        if why is not None:
            out[name or type(model).__name__] = why
    return out


def dynamic_int8_layers(model: nn.Module) -> list[str]:
    """Qualified names of slimguard's dynamic int8 Linear layers (they export as ``DynamicQuantizeLinear`` +
    ``MatMulInteger``)."""
    return [name for name, module in model.named_modules() if _registered_name(module) == DYNAMIC_INT8]


def _qualified_scope(scope: str) -> str:
    """The module name of a TorchScript exporter scope: ``/model/vit/layers.0/mlp/fc1`` (names relative to
    the parent) and ``/layers.0/layers.0.0`` (qualified names) give ``model.vit.layers.0.mlp.fc1`` and
    ``layers.0.0``."""
    name = ""
    for seg in scope.strip("/").split("/"):
        if seg:
            name = seg if not name or seg.startswith(name + ".") else f"{name}.{seg}"
    return name


def _requantize_dynamic(path: Path, layers: Sequence[str]) -> None:
    """Give the dynamic int8 layers of an exported float graph their int8 back: ORT's dynamic quantizer on
    exactly their MatMul/Gemm nodes (a node belongs to a layer when its scope names the layer, see
    :func:`_qualified_scope`). Weights are per output channel symmetric
    int8, as the layer stores them; activations become per-tensor uint8 per batch (ORT's
    ``DynamicQuantizeLinear``). A layer whose node is not found is an error, never dropped."""
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path), load_external_data=False).graph
    wanted = set(layers)
    nodes, found = [], set()
    for node in graph.node:
        scope = node.name.rsplit("/", 1)[0]
        for name in (_qualified_scope(scope), scope.rsplit("/", 1)[-1]):
            if node.op_type in ("MatMul", "Gemm") and name in wanted:
                nodes.append(node.name)
                found.add(name)
                break
    present = {_qualified_scope(n.name.rsplit("/", 1)[0]) for n in graph.node}
    present |= {n.name.rsplit("/", 1)[0].rsplit("/", 1)[-1] for n in graph.node}
    missing = sorted((wanted - found) & present)  # a layer no output depends on (a pooler) is not in the graph
    if missing or not found:
        layer = missing[0] if missing else sorted(wanted)[0]
        raise ModelError(f"ONNX export lost the int8 of layer {layer!r} (no MatMul/Gemm node of it in the "
                         "graph); export the float model and quantize it with quantize_onnx_dynamic")
    with tempfile.TemporaryDirectory(prefix="slimguard-q-") as tmp, quiet_ort_quantizer():
        out = Path(tmp) / "int8.onnx"
        # ORT's quantizer first splits a Gemm into "<name>_MatMul" + Add, then quantizes the MatMul
        quantize_dynamic(str(path), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_quantize=nodes + [f"{n}_MatMul" for n in nodes],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        kept = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(out), load_external_data=False).graph.node)
        if kept < len(found):
            raise ModelError(f"ONNX export: only {kept} of {len(found)} dynamic int8 layers became MatMulInteger "
                             "(a layer's weight is not a constant of the graph); refused rather than written as "
                             "float")
        os.replace(out, path)


def export_embedder(model: nn.Module, path: PathLike, *, max_length: int = 128, opset: int = 17,
                    attention: str | None = "eager") -> Path:
    """Export a text model (a :class:`~slimguard.models.hf.SentenceEmbedder`, or a Hugging Face classifier or
    causal LM wrapper of :mod:`slimguard.models.hf`) as ``(input_ids, attention_mask) -> embedding`` (or
    ``logits``) with dynamic batch and sequence length.

    ``attention="eager"`` (default) exports Hugging Face's plain attention (an additive mask) instead of
    the SDPA path, whose boolean-mask ``Where`` ops cost ORT time in every layer; the implementation is
    restored afterwards. ``None`` keeps the model's own.

    Shape:
        ``input_ids``, ``attention_mask``: ``(N, L)`` int64; ``embedding``: ``(N, D)``.
    """
    # torch's stub types every Module attribute as Tensor | Module, hiding the embedder's tokenize method
    enc = model.tokenize(["slimguard exports sentence embedders to ONNX.",  # type: ignore[operator]
                          "a second, longer example sentence so that padding is exercised"], max_length)
    task = getattr(model, "task", "embedding")  # a classifier's or language model's output is logits
    output = "embedding" if task == "embedding" else "logits"
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            output: {0: "batch", 1: "length"} if task == "causal-lm" else {0: "batch"}}
    encoder = getattr(model, "encoder", None) or getattr(model, "model", None)  # an embedder's, a classifier's
    before = getattr(getattr(encoder, "config", None), "_attn_implementation", None)
    switch = attention is not None and before is not None and hasattr(encoder, "set_attn_implementation")
    if switch and encoder is not None:  # switch implies an encoder (None has no set_attn_implementation)
        encoder.set_attn_implementation(attention)
    try:
        return export_onnx(model, (enc["input_ids"], enc["attention_mask"]), path,
                           input_names=["input_ids", "attention_mask"], output_names=[output],
                           dynamic_axes=axes, opset=opset)
    finally:
        if switch and encoder is not None:
            encoder.set_attn_implementation(before)


class OrtModel(nn.Module):
    """An ONNX Runtime session that is called like a torch module.

    Args:
        model: path of an ``.onnx`` file, or its bytes.
        num_threads: intra-op threads (default: ORT's choice).
        optimization: ``all`` (default), ``extended``, ``basic`` or ``disable``.
        keep_optimized: also write the graph ORT optimized (for :func:`check_int8_kernels`; default True).
        spinning: let idle ORT threads spin between calls (default False: spinning threads steal the
            cores from whatever runs next, e.g. the PyTorch model it is compared with).

    Shape:
        Whatever the exported model takes; tensors in, tensors out (one output -> a tensor).

    Example:
        >>> ort_model = OrtModel("m.onnx", num_threads=2)
        >>> logits = ort_model(torch.rand(8, 1, 32, 32))
    """

    def __init__(self, model: PathLike | bytes, num_threads: int | None = None, optimization: str = "all",
                 keep_optimized: bool = True, spinning: bool = False) -> None:
        super().__init__()
        ort = require("onnxruntime", "onnx")
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise ModelError(f"optimization {optimization!r} is not allowed; allowed: {', '.join(levels)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[optimization]
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if num_threads:
            so.intra_op_num_threads = num_threads
            so.inter_op_num_threads = 1
        self._tmp = tempfile.TemporaryDirectory(prefix="slimguard-ort-")
        self.optimized_path: str | None = None
        if keep_optimized:
            self.optimized_path = os.path.join(self._tmp.name, "optimized.onnx")
            so.optimized_model_filepath = self.optimized_path
        src = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.input_names):
            raise ModelError(f"{len(args)} inputs given; the ONNX model takes {self.input_names}")
        feeds = dict(zip(self.input_names[: len(args)], args, strict=True))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ModelError(f"ONNX model input(s) {missing} not given; it takes {self.input_names}")
        np_feeds = {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else v) for k, v in feeds.items()
                    if k in self.input_names}
        outs = [torch.from_numpy(o) for o in self.session.run(None, np_feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def op_counts(self) -> dict[str, int]:
        """Operator types (and counts) of the graph after ORT's optimizations."""
        onnx = require("onnx", "onnx")
        if self.optimized_path is None or not os.path.exists(self.optimized_path):
            raise ModelError("this OrtModel was built with keep_optimized=False; its optimized graph is unknown")
        graph = onnx.load(self.optimized_path, load_external_data=False).graph
        return dict(collections.Counter(n.op_type for n in graph.node))


def check_int8_kernels(model: OrtModel, *, expect: bool = True) -> dict[str, Any]:
    """Which int8 operators ORT chose for ``model`` (in its optimized graph).

    Returns ``{"int8_ops": {op: count}, "float_compute_ops": {op: count}, "ok": bool}``, where
    ``float_compute_ops`` counts Conv/MatMul/Gemm left in float. When ``expect`` and no int8 operator
    is present, a ``RuntimeWarning`` says so (the model then runs in float at float speed).
    """
    ops = model.op_counts()
    int8 = {k: v for k, v in ops.items() if k in INT8_OPS}
    float_ops = {k: v for k, v in ops.items()
                 if k in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")}
    ok = bool(int8)
    if expect and not ok:
        warnings.warn("ONNX Runtime chose no int8 kernel for this model (it runs in float); "
                      f"compute ops: {float_ops}", RuntimeWarning, stacklevel=2)
    return {"int8_ops": int8, "float_compute_ops": float_ops, "ok": ok}


def optimize_transformer(path: PathLike, out: PathLike, *, num_heads: int = 0, hidden_size: int = 0,
                         model_type: str = "bert") -> Path:
    """ORT's offline transformer fusions (SkipLayerNormalization, BiasGelu, attention where the pattern
    is recognised). ``num_heads=0`` / ``hidden_size=0`` let ORT detect them."""
    require("onnxruntime", "onnx")
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimizer.optimize_model(str(path), model_type=model_type, num_heads=num_heads,
                                   hidden_size=hidden_size, opt_level=1)
    opt.save_model_to_file(str(out))
    return Path(out)


def quantize_onnx_dynamic(path: PathLike, out: PathLike, *, per_channel: bool = True,
                          keep_float: Sequence[str] = (), optimize: bool = True, num_heads: int = 0,
                          hidden_size: int = 0) -> Path:
    """Dynamic int8 (int8 weights, activations quantized per batch) with slimguard's settings.

    Args:
        path: float ONNX model.
        out: where to write the int8 model.
        per_channel: one weight scale per output column (default True; ORT's default is per tensor,
            which costs MiniLM about 3 points of cosine).
        keep_float: substrings of node names to leave in float (e.g. ``"layer.5/output/dense"``).
        optimize: run :func:`optimize_transformer` first (default True; for transformer encoders).
    """
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(path)
    with tempfile.TemporaryDirectory(prefix="slimguard-q-") as tmp:
        if optimize:
            src = optimize_transformer(src, Path(tmp) / "fused.onnx", num_heads=num_heads, hidden_size=hidden_size)
        graph = onnx.load(str(src)).graph
        exclude = [n.name for n in graph.node if any(k in n.name for k in keep_float)] if keep_float else []
        with quiet_ort_quantizer():
            quantize_dynamic(str(src), str(out), per_channel=per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=exclude, op_types_to_quantize=["MatMul", "Gemm"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(out)


def quantize_onnx_static(path: PathLike, out: PathLike, calib_inputs: Iterable[dict[str, Any]], *,
                         per_channel: bool = True, calibration: str = "minmax",
                         keep_float: Sequence[str] = ()) -> Path:
    """Static int8 in QDQ format with ORT's calibrators (``minmax``, ``entropy``, ``percentile``).

    ``calib_inputs`` yields feeds ``{input_name: tensor or array}``; it is streamed once.
    """
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibration not in methods:
        raise ModelError(f"calibration {calibration!r} is not allowed; allowed: {', '.join(methods)}")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib_inputs)

        def get_next(self) -> dict[str, Any] | None:
            feed = next(self.it, None)
            if feed is None:
                return None
            return {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else v) for k, v in feed.items()}

    graph = onnx.load(str(path)).graph
    exclude = [n.name for n in graph.node if any(k in n.name for k in keep_float)] if keep_float else []
    with quiet_ort_quantizer():
        quantize_static(str(path), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibration], nodes_to_exclude=exclude)
    return Path(out)


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def quiet_ort_quantizer() -> Iterator[None]:
    """ORT's quantizer logs a pre-processing hint on the root logger for every call; drop only that.

    Used around every ``onnxruntime.quantization`` call (static and dynamic, here and in
    :mod:`slimguard.runtime.ort_transformer`); other records on the root logger pass.
    """
    root, flt = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def embedder_int8(model: nn.Module, out_dir: PathLike, *, num_threads: int | None = None,
                  keep_float: Sequence[str] = (), max_length: int = 128) -> OrtModel:
    """slimguard's int8 pipeline for a sentence embedder on CPU: export with plain (additive-mask)
    attention, per-channel dynamic int8 (weights int8 per output column, activations per batch), ORT
    session with all graph optimizations (ORT fuses LayerNorm, Gelu and the int8 MatMuls itself; the
    offline transformer optimizer is not used: on all-MiniLM-L6-v2 its fused graph ran slower).

    Writes ``model.onnx`` and ``model-int8.onnx`` to ``out_dir`` and returns the int8 :class:`OrtModel`.

    Example:
        >>> m = sg.models.load_model("minilm")
        >>> fast = embedder_int8(m, "out", num_threads=2)
        >>> emb = fast(**m.tokenize(["hello world"]))
    """
    out_dir = Path(out_dir)
    fp32 = export_embedder(model, out_dir / "model.onnx", max_length=max_length)
    cfg = getattr(getattr(model, "encoder", None), "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    int8 = quantize_onnx_dynamic(fp32, out_dir / "model-int8.onnx", keep_float=keep_float, optimize=False,
                                 num_heads=heads, hidden_size=hidden)
    return OrtModel(int8, num_threads=num_threads)


def onnx_bytes(path: PathLike) -> bytes:
    """The bytes of an ONNX file (for ``sg.save(..., extra_entries={"model.onnx": ...})``)."""
    return Path(path).read_bytes()
