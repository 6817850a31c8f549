import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Without a GPU the Triton kernels run on the CPU in Triton's interpreter. It is chosen when a
# kernel is decorated, so this must be set before anything imports edge_lolcats.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from edge_lolcats.formats.gguf_io import read_gguf
    from edge_lolcats.formats.loading import embedded_model_path

    return read_gguf(embedded_model_path("smollm2-135m"))


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_gguf):
    from edge_lolcats.formats.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smollm2_gguf.metadata)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (softmax), loaded once per session. Do not modify it."""
    from edge_lolcats.formats.loading import load_model

    return load_model("smollm2-135m")


# the tiny family configs and their builders are the benchmark's (edge-lolcats bench families)
from edge_lolcats.bench.families import FAMILY_CONFIGS, TINY, hf_tiny_model, ours_from_hf  # noqa: E402,F401

FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_model(family="llama", seed=0, **overrides):
    """A small random model of a family as our PyTorch model, in float32."""
    return ours_from_hf(hf_tiny_model(family, seed, **overrides))


@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer):
    """Factory: write a tiny random model of a family as an HF folder (safetensors + tokenizer)."""

    def make(family="llama", **overrides):
        model = hf_tiny_model(family, **overrides)
        folder = tmp_path / f"tiny-{family}"
        model.save_pretrained(folder, safe_serialization=True)
        smol_tokenizer.save(str(folder))
        return str(folder), model

    return make


def run_cli(*args, env=None, timeout=600):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge_lolcats.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
