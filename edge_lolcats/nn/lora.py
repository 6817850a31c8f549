"""LoRA as a plain module (torchtune style) with an exact merge.

``LoRALinear`` keeps the frozen ``weight`` and ``bias`` under their original names, so a model with
LoRA still loads base state dicts, and adds ``lora_a`` [r, in] and ``lora_b`` [out, r]:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

``lora_b`` starts at zero, so wrapping changes nothing until training moves it. Merging folds the
update into the weight: W' = W + (alpha / r) * B A.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}")
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_dim), requires_grad=False) if bias else None
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # off: the base layer alone (the teacher, for distillation)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        lora = cls(linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None)
        lora.to(linear.weight.device)
        lora.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            lora.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return lora

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        return out + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_b.weight @ self.lora_a.weight)

    def extra_repr(self):
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=DEFAULT_TARGETS,
               seed: int | None = None):
    """Wrap the target projections of every attention layer in :class:`LoRALinear` (in place).

    With ``seed``, ``lora_a`` is initialized from its own generator, independent of the global RNG
    (so that a resumed training run initializes LoRA exactly as an uninterrupted one)."""
    targets = tuple(targets)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in targets:
            module = getattr(attn, name, None)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"cannot put LoRA on {name!r}: not a linear layer of {type(attn).__name__}")
            lora = LoRALinear.from_linear(module, rank, alpha, dropout)
            if generator is not None:
                with torch.no_grad():
                    nn.init.kaiming_uniform_(lora.lora_a.weight, a=math.sqrt(5), generator=generator)
            setattr(attn, name, lora)
    lolcats = dict(getattr(model, "lolcats", None) or {})
    lolcats["lora"] = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    model.lolcats = lolcats
    return model


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    """Replace every :class:`LoRALinear` by an ``nn.Linear`` holding W + (alpha/r) B A (in place)."""
    for name, module in lora_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = nn.Linear(module.in_dim, module.out_dim, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.merged_weight())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        setattr(parent, child, linear)
    lolcats = dict(getattr(model, "lolcats", None) or {})
    if lolcats.pop("lora", None) is not None:
        lolcats["lora_merged"] = True
        model.lolcats = lolcats
    return model


def merge_lora_state_dict(state_dict: dict, rank: int, alpha: float) -> dict:
    """The same merge on a state dict: ``X.weight += alpha/rank * X.lora_b.weight @ X.lora_a.weight``."""
    merged = {k: v for k, v in state_dict.items() if ".lora_a." not in k and ".lora_b." not in k}
    for key in state_dict:
        if key.endswith(".lora_a.weight"):
            prefix = key[: -len(".lora_a.weight")]
            a, b = state_dict[key], state_dict[prefix + ".lora_b.weight"]
            merged[prefix + ".weight"] = state_dict[prefix + ".weight"] + (alpha / rank) * (b @ a)
    return merged
