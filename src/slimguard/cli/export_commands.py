"""``slimguard export``: write a model as ONNX (quantized slimguard layers become QDQ int8) and check it
on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimguard.cli.common import MODEL_ARG, Commands, Session, check_outputs, print_table

commands = Commands()
register = commands.register  # the CLI calls register(app)


@commands.add()
def export(
    s: Session,
    model: str = MODEL_ARG,
    format: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.onnx)."),
    int8: bool = typer.Option(False, help="Embedders only: also apply slimguard's ONNX int8 (per-channel "
                                          "dynamic) to the exported file."),
    embed_into: Path | None = typer.Option(None, "--embed-into",
                                           help="Also write a copy of the .slim artifact with model.onnx inside."),
) -> None:
    """Export a model to ONNX and verify it on ONNX Runtime (outputs compared with PyTorch)."""
    import torch

    from slimguard.core.errors import ConfigError, DataError
    from slimguard.core.torch_utils import eval_mode, forward
    from slimguard.models.sources import SentenceEmbedder
    from slimguard.models.spec import info
    from slimguard.runtime import onnx as sgonnx

    if format != "onnx":
        raise ConfigError(f"--format: {format!r} is not supported; allowed: onnx")
    check_outputs(out=out, embed_into=embed_into)  # before any work
    m = s.load(model)
    if isinstance(m, SentenceEmbedder):
        path = sgonnx.export_embedder(m, out)
        if int8:
            hf_config: Any = m.encoder.config  # a transformers config; torch's stub says Tensor | Module
            path = sgonnx.quantize_onnx_dynamic(path, out, num_heads=hf_config.num_attention_heads,
                                                hidden_size=hf_config.hidden_size)
        inputs: tuple = tuple(m.tokenize(["slimguard checks the exported model.", "a second sentence"]).values())
    else:
        shape = info(m).data.get("input_shape")
        if not shape:
            raise DataError("this model records no input shape; export it from Python with sg.export_onnx")
        low, high = info(m).data.get("low", 0.0), info(m).data.get("high", 1.0)
        lo = float(low if isinstance(low, (int, float)) else 0.0)
        hi = float(high if isinstance(high, (int, float)) else 1.0)
        x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)) * (hi - lo) + lo
        path = sgonnx.export_onnx(m, x[:1], out)
        inputs = (x,)
    ort_model = sgonnx.OrtModel(path)
    with eval_mode(m), torch.no_grad():
        ref = forward(m, inputs)
    got = ort_model(*inputs)
    kernels = sgonnx.check_int8_kernels(ort_model, expect=False)
    result = {"model": model, "onnx": str(path), "bytes": path.stat().st_size,
              "max_abs_diff": float((got - ref).abs().max()),
              "int8_ops": kernels["int8_ops"], "float_compute_ops": kernels["float_compute_ops"]}
    if ref.dim() == 2 and not isinstance(m, SentenceEmbedder):
        result["argmax_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    if embed_into is not None:
        from slimguard.artifact import save

        save(m, embed_into, extra_entries={"model.onnx": path.read_bytes()})
        result["artifact"] = str(embed_into)
    s.emit(result, lambda: print_table(f"export {model}", ["field", "value"],
                                       [(k, str(v)) for k, v in result.items()]))
