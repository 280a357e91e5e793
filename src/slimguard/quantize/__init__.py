"""Quantization: dynamic and static int8, weight-only int8/int4, QAT, mixed precision, ONNX deployment.

Layout: one module per method (``dynamic``, ``static``, ``weight_only`` with GPTQ, ``qat``, ``smooth``,
``cast``, ``mixed``, ``fuse``), built on shared parts that import none of them: ``common`` (layer selection,
module replacement), ``calibrate`` (streaming calibration data, model mode restored), ``observers``
(ranges -> scales), ``qmodules`` (fake-quant and int8 layers, prepare / convert) and ``kernels`` (the
integer matrix products on PyTorch's own operators).
"""
