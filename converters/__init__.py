"""Converters: LoRA merge and export of linearized models to ONNX and GGUF."""
