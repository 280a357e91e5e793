"""Runtime measurements (size, MACs, latency) and backends (export to ONNX Runtime)."""
