"""The PyTorch side of the model: the modules built from an ``arch.ModelArgs`` and run by the one
decoder definition (model.py), the hybrid attention's forms (hybrid_attention.py), LoRA (lora.py)
and generation (generate.py)."""
