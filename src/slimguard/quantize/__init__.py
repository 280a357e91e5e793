"""Quantization: dynamic and static int8, weight-only int8/int4, QAT, mixed precision, ONNX deployment."""
