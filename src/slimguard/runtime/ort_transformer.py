"""Transformer encoders on ONNX Runtime (ORT), in int8, carried inside a ``.slim`` artifact.

The ``ort-int8`` recipe step turns a sentence embedder (a Hugging Face BERT-family encoder plus pooling,
:class:`~slimguard.models.hf.SentenceEmbedder`) into the same embedder whose encoder runs on ORT:

1. :func:`export_encoder`: ``(input_ids, attention_mask) -> last_hidden_state`` with dynamic batch and
   length (so a batch is only as long as its longest text), Hugging Face's plain additive-mask attention;
2. optionally ORT's offline transformer optimizer (``optimize: true``: fused ``Attention``,
   ``SkipLayerNormalization``, ``BiasGelu``, ``EmbedLayerNormalization``; it then quantizes ``Attention`` to
   ``QAttention``). It is off by default: on a 2-core AVX-512 VNNI machine the fused int8 graph was not
   faster than the plain graph with ORT's session-time fusions (``benchmarks/results/encoder_cpu.json``);
3. dynamic int8 (:func:`quantize_graph`): int8 weights with one scale per output column (ORT's stock
   setting, one scale per tensor, costs MiniLM about 3 points of cosine), activations quantized per batch
   (u8 x s8 kernels, VNNI where the CPU has it), ``keep_float`` node names left in float; with
   ``quantize_embeddings`` (the default) the embedding tables too: int8 rows gathered, then dequantized
   (MiniLM's artifact: 53.4 to 18.3 MB, validation mean cosine 0.9929 to 0.9927, same speed);
4. the int8 graph's bytes replace the encoder as an :class:`OrtEncoder` module (a ``uint8`` buffer), so the
   artifact stores them as an ordinary tensor: sizes checked by the payload checks before anything is
   decoded, and :func:`check_graph` checked again before ORT sees them.

Pooling and normalisation stay in torch, so every pooling the embedder supports keeps working. With
``call_overhead_tokens`` the embedder's ``encode`` stops padding short texts to long ones where another
session run costs less (padding-aware batches, :func:`slimguard.models.hf.padding_groups`).

What a graph may hold (:func:`check_graph`): operators of the standard ONNX domains and ORT's own
``com.microsoft`` domain only, every weight inline (no external-data paths, which would make ORT read
files named by the artifact), no model-local functions, at most :data:`MAX_GRAPH_BYTES`. Nothing in an
artifact names code to run.

Example:
    >>> model = sg.models.load_model("minilm")
    >>> sg.quantize_(model, OrtInt8Config())          # model.encoder is now an OrtEncoder
    >>> emb = model.encode(["a sentence", "another"])  # ORT int8 underneath
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ArtifactError, ModelError, require
from slimguard.core.modules import register_module
from slimguard.core.registry import register_handler
from slimguard.runtime.onnx import INT8_OPS, export_onnx, optimize_transformer, quiet_ort_quantizer

MAX_GRAPH_BYTES = 2**31 - 1
"""The largest graph accepted (protobuf's own limit for one message)."""

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
"""Operator domains a stored graph's nodes may use: standard ONNX, ONNX-ML and ORT's built-in contrib
operators (all of them kernels compiled into ORT; no custom-operator library is ever registered). The
graph's opset imports may list more domains (ORT's optimizer adds some); only nodes run."""

_EXAMPLE = ["slimguard exports transformer encoders to ONNX.",
            "a second, longer example sentence, so that padding is part of the traced graph"]


# ---- export ------------------------------------------------------------------------------------------
class _HiddenStates(nn.Module):
    """``encoder(input_ids, attention_mask)`` -> its last hidden state (the tensor pooling reads)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def _check_embedder(model: nn.Module) -> nn.Module:
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module) or not callable(getattr(model, "tokenize", None)):
        raise ModelError(f"ort-int8 applies to sentence embedders (an encoder plus pooling, e.g. minilm or hf:DIR "
                         f"with task embedding); {type(model).__name__} is not one")
    if isinstance(encoder, OrtEncoder):
        raise ModelError("this embedder's encoder already runs on ONNX Runtime; apply ort-int8 once, last")
    return encoder


@contextlib.contextmanager
def _eager_attention(encoder: nn.Module) -> Iterator[None]:
    """Export Hugging Face's plain attention (an additive mask): the SDPA path's boolean-mask ``Where``
    ops cost ORT time in every layer. The implementation is restored afterwards."""
    before = getattr(getattr(encoder, "config", None), "_attn_implementation", None)
    switch = before is not None and hasattr(encoder, "set_attn_implementation")
    if switch:
        encoder.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        if switch:
            encoder.set_attn_implementation(before)  # type: ignore[operator]


def export_encoder(model: nn.Module, path: str | Path, *, max_length: int = 128, opset: int = 17) -> Path:
    """Export a sentence embedder's encoder as ``(input_ids, attention_mask) -> last_hidden_state``.

    Batch and sequence length are dynamic, so a length-sorted batch of short texts runs short.

    Shape:
        ``input_ids``, ``attention_mask``: ``(N, L)`` int64; ``last_hidden_state``: ``(N, L, hidden)``.
    """
    encoder = _check_embedder(model)
    enc = model.tokenize(_EXAMPLE, max_length)  # type: ignore[operator]
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            "last_hidden_state": {0: "batch", 1: "length"}}
    with _eager_attention(encoder):
        return export_onnx(_HiddenStates(encoder), (enc["input_ids"], enc["attention_mask"]), path,
                           input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                           dynamic_axes=axes, opset=opset)


def _heads_and_width(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(getattr(model, "encoder", None), "config", None)
    return int(getattr(cfg, "num_attention_heads", 0) or 0), int(getattr(cfg, "hidden_size", 0) or 0)


def int8_encoder_graph(model: nn.Module, work_dir: str | Path, *, per_channel: bool = True, optimize: bool = False,
                       keep_float: Sequence[str] = (), max_length: int = 128,
                       embeddings: bool = False) -> dict[str, Path]:
    """Export, optionally fuse, and quantize a sentence embedder's encoder (steps 1-3 of the module doc).

    Returns ``{"fp32": path, "int8": path}`` (files in ``work_dir``).
    """
    work = Path(work_dir)
    heads, width = _heads_and_width(model)
    fp32 = export_encoder(model, work / "encoder-fp32.onnx", max_length=max_length)
    src = optimize_transformer(fp32, work / "encoder-fused.onnx", num_heads=heads, hidden_size=width) if optimize \
        else fp32
    int8 = quantize_graph(src, work / "encoder-int8.onnx", per_channel=per_channel, keep_float=keep_float,
                          embeddings=embeddings)
    return {"fp32": fp32, "int8": int8}


WEIGHT_OPS = ("MatMul", "Gemm", "Attention")
EMBEDDING_OPS = ("Gather", "EmbedLayerNormalization")
"""What :func:`quantize_graph` hands ORT's quantizer: weight products, and with ``embeddings`` the lookups of
the embedding tables (plain ``Gather`` of a stored table, or the optimizer's fused ``EmbedLayerNormalization``;
a ``Gather`` of a computed tensor, such as a shape, has no table and stays as it is)."""


def quantize_graph(path: str | Path, out: str | Path, *, per_channel: bool = True,
                   keep_float: Sequence[str] = (), embeddings: bool = False) -> Path:
    """Dynamic int8 of a (plain or transformer-optimized) graph: weight ``MatMul`` / ``Gemm`` and fused
    ``Attention`` (which becomes ``QAttention``: int8 Q, K, V projections) get int8 weights, one scale per
    output column when ``per_channel``; with ``embeddings`` the embedding tables are stored in int8 too
    (one scale per table; the rows a batch looks up are dequantized); nodes whose names contain a
    ``keep_float`` string stay in float."""
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path), load_external_data=False).graph
    exclude = [n.name for n in graph.node if any(k in n.name for k in keep_float)]
    ops = [*WEIGHT_OPS, *EMBEDDING_OPS] if embeddings else list(WEIGHT_OPS)
    with quiet_ort_quantizer():
        quantize_dynamic(str(path), str(out), per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, op_types_to_quantize=ops,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(out)


def int8_tables(blob: bytes) -> int:
    """How many embedding tables the graph in ``blob`` stores in 8 bits (a ``Gather`` from an 8-bit
    initializer, or a quantized fused embedding layer)."""
    onnx = require("onnx", "onnx")
    graph = onnx.load_from_string(bytes(blob)).graph
    eight_bit = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    return sum(1 for n in graph.node if (n.op_type == "Gather" and n.input and n.input[0] in eight_bit)
               or n.op_type == "QEmbedLayerNormalization")


# ---- what a stored graph may hold ---------------------------------------------------------------------
def _graphs(graph: Any) -> Iterator[Any]:
    """A graph and every subgraph in its nodes' attributes (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def check_graph(blob: bytes, where: str = "ONNX graph") -> Any:
    """Parse ``blob`` as an ONNX model and refuse what an artifact's graph may not hold; return the model.

    Raises:
        ArtifactError: over :data:`MAX_GRAPH_BYTES`, not a valid ONNX model, an operator outside
            :data:`ALLOWED_DOMAINS` (in any subgraph), a tensor stored as external data (a file path), or
            model-local functions.
    """
    if len(blob) > MAX_GRAPH_BYTES:
        raise ArtifactError(f"{where}: {len(blob):,} bytes is over the {MAX_GRAPH_BYTES:,}-byte limit for a graph")
    onnx = require("onnx", "onnx")
    try:
        proto = onnx.load_from_string(bytes(blob))
    except Exception as exc:  # protobuf raises its own DecodeError and friends
        raise ArtifactError(f"{where}: not a valid ONNX model ({type(exc).__name__})") from None
    if not proto.HasField("graph"):
        raise ArtifactError(f"{where}: the ONNX model has no graph")
    if len(proto.functions):
        raise ArtifactError(f"{where}: model-local functions are not accepted in a stored graph")
    for graph in _graphs(proto.graph):
        for node in graph.node:
            if node.domain not in ALLOWED_DOMAINS:
                raise ArtifactError(f"{where}: operator {node.domain}.{node.op_type} is not allowed; allowed "
                                    f"domains: {sorted(ALLOWED_DOMAINS)}")
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
                raise ArtifactError(f"{where}: tensor {tensor.name!r} refers to external data; a stored graph "
                                    "must hold every weight inline")
    return proto


def graph_ops(blob: bytes) -> dict[str, int]:
    """Operator types of a graph and how many of each."""
    proto = check_graph(blob)
    return dict(collections.Counter(n.op_type for g in _graphs(proto.graph) for n in g.node))


# ---- the module an artifact stores ----------------------------------------------------------------------
@register_module("ort-encoder")
class OrtEncoder(nn.Module):
    """An encoder that runs an ONNX graph on ORT's CPU provider; the graph's bytes are its ``graph`` buffer.

    Called like a Hugging Face encoder: ``encoder(input_ids=..., attention_mask=...)`` returns
    ``(last_hidden_state,)``. The ORT session is built on first use, after :func:`check_graph`, and again
    whenever the buffer is replaced (as an artifact load does).

    Args:
        nbytes: length of the graph buffer (the artifact rebuilds the module empty, then fills it).
        hidden_size: width of the hidden states (recorded for inspection).
        num_threads: ORT intra-op threads; 0 (default) = torch's thread count when the session is built, so
            ``torch.set_num_threads`` and :func:`slimguard.runtime.measure.compare_speed` pin both runtimes.
        call_overhead_tokens: what one session run costs beyond its tokens' work, in tokens; when above 0,
            the embedder's ``encode`` makes padding-aware batches (:func:`slimguard.models.hf.padding_groups`)
            instead of fixed ones (default 0).

    Example:
        >>> enc = OrtEncoder.from_bytes(Path("encoder-int8.onnx").read_bytes(), hidden_size=384)
        >>> hidden, = enc(input_ids=ids, attention_mask=mask)
    """

    graph: torch.Tensor
    not_weights = frozenset({"graph"})  # the serialized graph is not counted as parameters

    def __init__(self, nbytes: int = 0, hidden_size: int = 0, num_threads: int = 0,
                 call_overhead_tokens: int = 0) -> None:
        super().__init__()
        for name, value, high in (("nbytes", nbytes, MAX_GRAPH_BYTES), ("hidden_size", hidden_size, 1 << 20),
                                  ("num_threads", num_threads, 1024),
                                  ("call_overhead_tokens", call_overhead_tokens, 1 << 20)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise ArtifactError(f"ort-encoder {name}={value!r} is not an integer in [0, {high}]")
        self.nbytes = nbytes
        self.hidden_size = hidden_size
        self.num_threads = num_threads
        self.call_overhead_tokens = call_overhead_tokens
        self.register_buffer("graph", torch.zeros(nbytes, dtype=torch.uint8))
        self._session: Any = None
        self._session_key: tuple[int, int, int] | None = None

    @classmethod
    def from_bytes(cls, blob: bytes, *, hidden_size: int = 0, num_threads: int = 0,
                   call_overhead_tokens: int = 0) -> OrtEncoder:
        """An encoder holding ``blob`` (checked by :func:`check_graph` first)."""
        check_graph(blob)
        enc = cls(nbytes=len(blob), hidden_size=hidden_size, num_threads=num_threads,
                  call_overhead_tokens=call_overhead_tokens)
        if blob:
            enc.graph.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        return enc

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"nbytes": self.nbytes, "hidden_size": self.hidden_size, "num_threads": self.num_threads,
                "call_overhead_tokens": self.call_overhead_tokens}

    def graph_bytes(self) -> bytes:
        """The stored graph."""
        return self.graph.detach().cpu().numpy().tobytes()

    def session(self) -> Any:
        """The ORT session for the current buffer (built, after :func:`check_graph`, when the buffer changed)."""
        graph = self.graph
        threads = self.num_threads or torch.get_num_threads()
        key = (graph.data_ptr(), graph.numel(), threads)
        if self._session is None or self._session_key != key:
            ort = require("onnxruntime", "onnx")
            blob = self.graph_bytes()
            check_graph(blob, "ort-encoder graph")
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            # idle threads that spin steal the cores from whatever runs next (tokenising, pooling)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            try:
                self._session = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise ModelError(f"ONNX Runtime cannot load the stored graph: {str(exc).splitlines()[0]}") from None
            self._session_key = key
        return self._session

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> tuple[torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        sess = self.session()
        feeds = {"input_ids": input_ids.detach().to(torch.int64).cpu().numpy(),
                 "attention_mask": attention_mask.detach().to(torch.int64).cpu().numpy()}
        wanted = {i.name for i in sess.get_inputs()}
        hidden = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]
        return (torch.from_numpy(hidden),)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # an ORT session cannot be copied or pickled: rebuilt on first use
        state["_session"], state["_session_key"] = None, None
        return state

    def weight_counts(self) -> tuple[int, int]:
        """``(weights, nonzero)`` in the stored graph's initializers (what ``count_params`` reports for this
        module, instead of the graph's bytes)."""
        onnx = require("onnx", "onnx")
        from onnx import numpy_helper

        total = nonzero = 0
        for init in onnx.load_from_string(self.graph_bytes()).graph.initializer:
            arr = numpy_helper.to_array(init)
            total += int(arr.size)
            nonzero += int((arr != 0).sum())
        return total, nonzero

    def extra_repr(self) -> str:
        return (f"nbytes={self.nbytes}, hidden_size={self.hidden_size}, num_threads={self.num_threads}, "
                f"call_overhead_tokens={self.call_overhead_tokens}")


# ---- the recipe step ------------------------------------------------------------------------------------
@register_config("ort-int8")
@dataclasses.dataclass
class OrtInt8Config(Config):
    """Run a sentence embedder's encoder on ONNX Runtime in int8 (see the module docstring).

    Args:
        per_channel: one int8 scale per weight column (default True; False is ORT's stock per-tensor).
        optimize: run ORT's offline transformer optimizer before quantizing (default False).
        keep_float: substrings of ONNX node names left in float, e.g. ``["layer.5/output/dense"]``.
        max_length: token limit of the export's example batch (default 128; the graph takes any length).
        num_threads: ORT threads; 0 (default) follows torch's thread count.
        quantize_embeddings: store the embedding tables in int8 too (default True; ORT's stock int8 does
            the same). For MiniLM the artifact shrinks from 53.4 to 18.3 MB at the same speed and 0.0002 less
            mean cosine on docs-text validation texts (``benchmarks/results/optimize.json``); ``false`` keeps
            them in float, the most faithful.
        call_overhead_tokens: what one ORT session run costs beyond its tokens' work, in tokens (default 64,
            chosen for MiniLM on docs-text validation texts). ``encode`` sorts texts by token count and cuts
            them into runs of at most ``batch_size`` wherever padding short texts to a long one costs more
            than another run (:func:`slimguard.models.hf.padding_groups`); 0 batches ``batch_size`` texts
            longest first by characters, as sentence-transformers does.

    In a recipe (the last step; the encoder then has no torch weights left to train)::

        - ort-int8: {per_channel: true, keep_float: []}
    """

    per_channel: bool = True
    optimize: bool = False
    keep_float: list[str] = dataclasses.field(default_factory=list)
    max_length: int = 128
    num_threads: int = 0
    quantize_embeddings: bool = True
    call_overhead_tokens: int = 64

    def validate(self) -> None:
        check_range("max_length", self.max_length, 2, 1 << 16)
        check_range("num_threads", self.num_threads, 0, 1024)
        check_range("call_overhead_tokens", self.call_overhead_tokens, 0, 1 << 20)


@register_handler("quantize", OrtInt8Config)
def _ort_int8_step(model: nn.Module, config: OrtInt8Config, **_context: Any) -> dict[str, Any]:
    _check_embedder(model)
    width = _heads_and_width(model)[1]
    with tempfile.TemporaryDirectory(prefix="slimguard-ort-int8-") as tmp:
        paths = int8_encoder_graph(model, tmp, per_channel=config.per_channel, optimize=config.optimize,
                                   keep_float=config.keep_float, max_length=config.max_length,
                                   embeddings=config.quantize_embeddings)
        fp32_bytes = paths["fp32"].stat().st_size
        blob = paths["int8"].read_bytes()
    ops = graph_ops(blob)
    tables = int8_tables(blob)
    if config.quantize_embeddings and not tables:
        warnings.warn("ort-int8: quantize_embeddings is set but no embedding table was stored in int8 (none is "
                      "looked up from a stored table, or keep_float names them all); the tables stay in float",
                      stacklevel=2)
    encoder = OrtEncoder.from_bytes(blob, hidden_size=width, num_threads=config.num_threads,
                                    call_overhead_tokens=config.call_overhead_tokens)
    model.encoder = encoder
    return {"graph_bytes": len(blob), "fp32_graph_bytes": fp32_bytes, "optimized": config.optimize,
            "call_overhead_tokens": config.call_overhead_tokens, "int8_embedding_tables": tables,
            "per_channel": config.per_channel, "keep_float": list(config.keep_float),
            "int8_ops": {k: v for k, v in sorted(ops.items()) if k in INT8_OPS or k == "MatMulInteger"},
            "float_matmuls": sum(v for k, v in ops.items() if k in ("MatMul", "Gemm"))}
