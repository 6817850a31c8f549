"""LoLCATs training: the two stages and their checkpoints (train.py), the corpus (data.py)."""
