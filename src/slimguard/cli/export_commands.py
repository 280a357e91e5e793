"""``slimguard export``: write a model as ONNX (static int8 becomes QDQ, dynamic int8 MatMulInteger) and
check it on ONNX Runtime, or (``--format hf``) as a folder transformers loads with ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimguard.cli.common import MODEL_ARG, Commands, Session, check_out_dir, check_outputs, print_table, staged_outputs

commands = Commands()
register = commands.register  # the CLI calls register(app)


@commands.add(user_models=True)
def export(
    s: Session,
    model: str = MODEL_ARG,
    format: str = typer.Option("onnx", "--format", "-f", help="Export format: onnx, or hf (a Hugging Face folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: model.onnx is written in it; with --format "
                                                      "hf, the Hugging Face files (the folder must be new or empty)."),
    int8: bool = typer.Option(False, "--int8/--no-int8", help="Embedders only: also apply slimguard's ONNX int8 "
                                                              "(per-channel dynamic) to the exported file."),
    embed_into: Path | None = typer.Option(None, "--embed-into", metavar="FILE.slim",
                                           help="Also write a copy of the .slim artifact with model.onnx inside."),
) -> None:
    """Export a model to OUT/model.onnx and verify it on ONNX Runtime (outputs compared with PyTorch); int8
    layers stay int8 (static: QDQ, dynamic: MatMulInteger). ``--format hf`` writes a Hugging Face folder
    instead, tokenizer included; pruned sizes its config cannot describe (per-layer head counts or FFN widths,
    fewer BERT or GPT-2 heads) are written zero-padded, with the same outputs and a warning. A run that fails
    writes nothing."""
    from slimguard.core.errors import ConfigError

    if format not in ("onnx", "hf"):
        raise ConfigError(f"--format: {format!r} is not supported; allowed: onnx, hf")
    if format == "hf":
        _export_hf(s, model, out)
        return
    check_out_dir(out, "model.onnx")  # before any work
    check_outputs(embed_into=embed_into)
    m = s.load(model)
    with staged_outputs(out) as stage:  # OUT/model.onnx appears only once it is verified
        result = _export_onnx(m, model, stage / "model.onnx", int8=int8, embed_into=embed_into)
    result["onnx"] = str(out / "model.onnx")
    s.emit(result, lambda: print_table(f"export {model}", ["field", "value"],
                                       [(k, str(v)) for k, v in result.items()]))
    s.wrote(out / "model.onnx", *([] if embed_into is None else [embed_into]))


def _export_hf(s: Session, model: str, out: Path) -> None:
    """Write the Hugging Face folder of ``model`` into ``out`` (new or empty); its files appear only once the
    folder has been loaded back and checked. A pruned shape the config cannot describe is written zero-padded
    (export_hf warns, in one line); the record says so, with the number of zero heads and FFN neurons."""
    import json

    from slimguard.core.errors import ConfigError
    from slimguard.models.hf import export_hf
    from slimguard.models.hf_export import RECORD_KEY

    check_out_dir(out)  # before any work
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: is not empty; --format hf needs a new or empty folder")
    m = s.load(model)
    with staged_outputs(out) as stage:
        export_hf(m, stage)
    files = sorted(p.name for p in out.iterdir())
    padding = json.loads((out / "config.json").read_text()).get(RECORD_KEY) or {}
    zero = {key: sum(stop - start for ranges in padding.get(key, {}).values() for start, stop in ranges)
            for key in ("zero_heads", "zero_ffn_neurons")}
    result = {"model": model, "format": "hf", "out": str(out), "files": files,
              "zero_padded": bool(padding.get("zero_padded")), **zero}
    s.emit(result, lambda: print_table(f"export {model}", ["field", "value"], [
        (k, ", ".join(v) if isinstance(v, list) else str(v)) for k, v in result.items()]))
    s.wrote(*(out / name for name in files))


def _export_onnx(m: Any, model: str, out: Path, *, int8: bool, embed_into: Path | None) -> dict[str, Any]:
    """Export ``m`` to the file ``out``, run it on ONNX Runtime against PyTorch and, with ``embed_into``, save a
    copy of the artifact holding it; returns the export's record (bytes, largest difference, int8 kernels)."""
    import torch

    from slimguard.core.errors import DataError
    from slimguard.core.torch_utils import eval_mode, forward
    from slimguard.models.sources import SentenceEmbedder
    from slimguard.models.spec import info
    from slimguard.runtime import onnx as sgonnx

    if callable(getattr(m, "tokenize", None)):  # a text model: (input_ids, attention_mask) -> output
        path = sgonnx.export_embedder(m, out)
        if int8 and isinstance(m, SentenceEmbedder):
            hf_config: Any = m.encoder.config  # a transformers config; torch's stub says Tensor | Module
            path = sgonnx.quantize_onnx_dynamic(path, out, num_heads=hf_config.num_attention_heads,
                                                hidden_size=hf_config.hidden_size)
        tok: Any = m.tokenize  # torch's stub types Module attributes as Tensor | Module
        inputs: tuple = tuple(tok(["slimguard checks the exported model.", "a second sentence"]).values())
    else:
        shape = info(m).data.get("input_shape")
        if not shape:
            raise DataError("this model records no input shape; pass --input-shape, e.g. --input-shape 1,32,32")
        low, high = info(m).data.get("low", 0.0), info(m).data.get("high", 1.0)
        lo = float(low if isinstance(low, (int, float)) else 0.0)
        hi = float(high if isinstance(high, (int, float)) else 1.0)
        x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)) * (hi - lo) + lo
        path = sgonnx.export_onnx(m, x[:1], out)
        inputs = (x,)
    ort_model = sgonnx.OrtModel(path)
    int8_layers = sgonnx.dynamic_int8_layers(m)
    with eval_mode(m), torch.no_grad():
        ref = forward(m, inputs)
    got = ort_model(*inputs)
    kernels = sgonnx.check_int8_kernels(ort_model, expect=bool(int8_layers))
    result = {"model": model, "onnx": str(path), "bytes": path.stat().st_size,
              "max_abs_diff": float((got - ref).abs().max()),
              "int8_ops": kernels["int8_ops"], "float_compute_ops": kernels["float_compute_ops"]}
    if ref.dim() == 2 and not isinstance(m, SentenceEmbedder):
        result["argmax_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    if embed_into is not None:
        from slimguard.artifact import save

        save(m, embed_into, extra_entries={"model.onnx": path.read_bytes()})
        result["artifact"] = str(embed_into)
    return result
