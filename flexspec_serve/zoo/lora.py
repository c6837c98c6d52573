"""Low-rank adapters for the evolving upper layers, merged back into plain Linear weights.

Only the adapter (A, B) is trained; merging adds B·A·scale to the frozen weight, so a merged version is
an ordinary `LlamaForCausalLM` checkpoint and every tensor outside the adapted layers stays bitwise equal.
"""

from __future__ import annotations

import torch
from torch import nn

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=5**0.5, generator=generator)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_adapters(model: nn.Module, layer_ids: list[int], rank: int, alpha: float, seed: int) -> list[nn.Parameter]:
    """Wrap the linear maps of `layer_ids` in adapters; returns the adapter parameters (all that trains)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i in layer_ids:
        layer = model.model.layers[i]
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGET_MODULES:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    wrapped = LoRALinear(base, rank, alpha, gen)
                    setattr(parent, name, wrapped)
                    params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_adapters(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
