"""Torch-free runtime for linearized models (numpy, onnxruntime, gguf, tokenizers).

Never import torch here, directly or through another module: a test imports this package in an
interpreter where torch cannot be imported.
"""
from .api import Model, Session, load  # noqa: E402,F401 - the public API
