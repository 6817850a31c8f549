"""Files: GGUF reading (gguf_io.py, torch-free), tokenizers (tokenizer.py, torch-free), atomic
writes (fileio.py), resolving a model name or path into our PyTorch model (loading.py) and
linearized checkpoints (checkpoint.py). Nothing here imports torch at package import."""
