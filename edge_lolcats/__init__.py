"""edge-lolcats: linearize a Transformer LLM (LoLCATs) and run it in fixed memory.

The package root imports nothing heavy: torch and transformers load only when a submodule that
needs them is imported, so the torch-free runtime (``edge_lolcats.runtime``) works without torch.
"""
__version__ = "0.1.0"
