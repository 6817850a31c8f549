"""The shipped linearization `smollm2-135m-lolcats` (a trained delta on the embedded SmolLM2) and
the exact LoRA merge on it.

Merge tolerance: the merge is exact algebra (W + s·BA applied once instead of Wx + s·B(Ax)); the
only differences are rounding. The issue asks for 1e-5 in float32, but float32 rounding alone moves
SmolLM2's logits (|x| up to ~36) by ~6e-5 from a float64 run over 30 layers: measured here, the
unmerged float32 model is as far from float64 as the merged one. So the bound is calibrated on the
same input: the merge may add no more than the unmerged float32 model's own distance from float64
(x2). A float64 model is not float64 end to end (transformers' RMSNorm computes in float32), so
its merged/unmerged gap (~5e-6) is held to the same bound rather than to float64 rounding.
"""
import copy

import pytest
import torch

from edge_lolcats.training.data import load_corpus
from edge_lolcats.nn.lora import lora_modules, merge_lora
from edge_lolcats.nn.model import forward, linearize


@pytest.fixture(scope="module")
def shipped():
    from edge_lolcats.formats.loading import load_model

    return load_model("smollm2-135m-lolcats")


@pytest.fixture(scope="module")
def heldout_text(shipped):
    """512 tokens of held-out text from the training split (never trained on)."""
    corpus = load_corpus(shipped.tokenizer, seq_len=1024)
    return torch.from_numpy(corpus.heldout[0, :512])


def test_name_resolves_to_the_trained_delta(shipped):
    cfg = shipped.model.lolcats
    assert shipped.kind == "lolcats-checkpoint" and cfg["layout"] == "delta" and cfg["base"] == "smollm2-135m"
    assert len(lora_modules(shipped.model)) == 30 * 4
    # trained, not the identity initialisation: LoRA B is zero-initialised, window factors start equal
    assert all(m.lora_b.weight.abs().max() > 0 for _, m in lora_modules(shipped.model))
    factors = torch.stack([layer.self_attn.window_factor for layer in shipped.model.model.layers])
    assert factors.std() > 0.1


@torch.inference_mode()
def test_trained_model_beats_the_untrained_linearization_beyond_the_window(shipped, smollm2, heldout_text):
    """Past the 64-token window the untrained feature maps are a poor imitation of softmax; the
    trained ones must be closer to the teacher (held-out loss on tokens 64..511)."""
    untrained = linearize(copy.deepcopy(smollm2.model))
    ids = heldout_text[None]

    def nll(model):
        logits, _ = forward(model, ids, with_state=False)
        return torch.nn.functional.cross_entropy(logits[0, 64:-1], ids[0, 65:]).item()

    teacher, _ = forward(smollm2.model, ids, with_state=False)
    teacher_nll = torch.nn.functional.cross_entropy(teacher[0, 64:-1], ids[0, 65:]).item()
    trained, baseline = nll(shipped.model), nll(untrained)
    assert trained < baseline - 0.5, (trained, baseline)
    assert trained < teacher_nll + 0.5, (trained, teacher_nll)


@torch.inference_mode()
def test_lora_merge_is_exact_on_the_real_trained_model(shipped, heldout_text):
    ids = heldout_text[None, :192]
    model32 = shipped.model
    model64 = copy.deepcopy(model32).double()
    unmerged32, _ = forward(model32, ids, with_state=False)
    unmerged64, _ = forward(model64, ids, with_state=False)
    merged32, _ = forward(merge_lora(copy.deepcopy(model32)), ids, with_state=False)
    merged64, _ = forward(merge_lora(model64), ids, with_state=False)

    for _, m in lora_modules(model32):
        m.enabled = False
    try:
        without_lora, _ = forward(model32, ids, with_state=False)
    finally:
        for _, m in lora_modules(model32):
            m.enabled = True
    assert (without_lora - unmerged32).abs().max() > 1.0  # the LoRA matters, so the check has teeth

    noise = (unmerged32.double() - unmerged64).abs().max().item()
    assert noise < 1e-3  # sanity: float32 vs float64 is rounding, not a different model
    assert (merged64 - unmerged64).abs().max().item() <= noise
    assert (merged32 - unmerged32).abs().max().item() <= 2 * noise, noise
    assert (merged32.double() - unmerged64).abs().max().item() <= 2 * noise
