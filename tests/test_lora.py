"""LoRA: a plain module whose merge is exact."""
import torch
import torch.nn as nn
from conftest import tiny_model

from edge_lolcats.nn.lora import LoRALinear, apply_lora, lora_modules, merge_lora, merge_lora_state_dict
from edge_lolcats.nn.model import forward, linearize


def test_hand_set_values_make_the_merge_obvious():
    base = nn.Linear(2, 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    lora = LoRALinear.from_linear(base, rank=1, alpha=2.0)  # scaling 2
    with torch.no_grad():
        lora.lora_a.weight.copy_(torch.tensor([[1.0, 2.0]]))  # A [1, 2]
        lora.lora_b.weight.copy_(torch.tensor([[3.0], [0.0]]))  # B [2, 1]
    # W' = W + 2 * B A = [[1 + 6, 12], [0, 1]]
    assert torch.equal(lora.merged_weight(), torch.tensor([[7.0, 12.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, 1.0]])
    assert torch.equal(lora(x), torch.tensor([[19.5, 0.5]]))


def test_zero_init_changes_nothing_and_only_lora_trains():
    model = tiny_model()
    x = torch.randint(0, 49152, (1, 20))
    with torch.no_grad():
        before, _ = forward(model, x)
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(forward(model, x)[0], before, atol=0, rtol=0)
    assert len(lora_modules(model)) == 2 * 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    frozen_in_lora = [n for n, p in model.named_parameters() if ".q_proj.weight" in n and p.requires_grad]
    assert len(trainable) == 2 * 4 * 2 and not frozen_in_lora


def test_merge_is_exact_on_a_linearized_model():
    model = linearize(tiny_model("qwen2"), window_size=8, feature_dim=8)  # qwen2: q/k/v have biases
    apply_lora(model, rank=4, alpha=16)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.weight.normal_(std=0.5)
    x = torch.randint(0, 49152, (2, 30))
    with torch.no_grad():
        expected, _ = forward(model, x)
        sd = merge_lora_state_dict(model.state_dict(), rank=4, alpha=16)
        merge_lora(model)
        got, _ = forward(model, x)
    assert not lora_modules(model)
    assert (got - expected).abs().max() < 1e-5  # float32: only the order of the two matmuls differs
    assert (expected - forward(linearize(tiny_model("qwen2"), window_size=8, feature_dim=8), x)[0]).abs().max() > 1e-2
    for key, value in model.state_dict().items():
        if "feature_map" not in key and "window_factor" not in key:
            assert torch.equal(sd[key], value), key
    assert model.lolcats.get("lora_merged") is True


def test_checkpoint_with_lora_roundtrips(tiny_model_dir, tmp_path):
    from edge_lolcats.formats.checkpoint import save_checkpoint
    from edge_lolcats.formats.loading import load_model

    folder, _ = tiny_model_dir()
    loaded = load_model(folder)
    model = apply_lora(linearize(loaded.model, window_size=8, feature_dim=8), rank=2, alpha=4)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.weight.normal_()
    x = torch.randint(0, 49152, (1, 25))
    with torch.no_grad():
        expected, _ = forward(model, x)
    for base in (None, folder):
        out = save_checkpoint(model, loaded.tokenizer, str(tmp_path / f"ckpt-{base is None}"), base=base)
        again = load_model(out).model
        assert len(lora_modules(again)) == 8
        with torch.no_grad():
            torch.testing.assert_close(forward(again, x)[0], expected, atol=0, rtol=0)
