"""A minimal LoRA for the demo VLM's language model: ``W x + (alpha/r) B A x`` on chosen linear layers, trained,
then merged into ``W`` (``W + (alpha/r) B A``) so the exported LLM is an ordinary one.

Written here rather than taken from ``peft`` because the merge must be the same code at training and at assembly
(the committed adapter is merged into the GGUF-derived weights every time the demo is built), and it is 40 lines.
"""

from __future__ import annotations

import torch
from torch import nn

TARGETS = ("q_proj", "v_proj", "o_proj")


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # starts as the identity change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: tuple = TARGETS) -> list:
    """Wrap every ``targets`` linear of ``model`` (in place); returns the new trainable parameters."""
    params = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                wrapped = LoraLinear(child, rank, alpha)
                setattr(module, child_name, wrapped)
                params += [wrapped.lora_A, wrapped.lora_B]
    return params


def lora_state(model: nn.Module) -> dict:
    """``{"<linear>.lora_A": A, "<linear>.lora_B": B, "<linear>.scale": s}`` for every wrapped layer."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            state[f"{name}.lora_A"] = module.lora_A.detach().clone()
            state[f"{name}.lora_B"] = module.lora_B.detach().clone()
            state[f"{name}.scale"] = torch.tensor(module.scale)
    return state


def merge_lora(model: nn.Module, state: dict) -> None:
    """``W += scale * B @ A`` for each adapter in ``state`` (names as :func:`lora_state` wrote them)."""
    modules = dict(model.named_modules())
    for key in [k for k in state if k.endswith(".lora_A")]:
        name = key[: -len(".lora_A")]
        if name not in modules or not isinstance(modules[name], nn.Linear):
            raise KeyError(f"the LoRA names {name!r}, which is not a linear layer of this model")
        delta = float(state[f"{name}.scale"]) * state[f"{name}.lora_B"].float() @ state[key].float()
        modules[name].weight.data += delta.to(modules[name].weight.dtype)
