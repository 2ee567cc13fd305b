"""ONNX side: the op registry (single source of truth for the dhsa custom ops), export, rewrite."""
