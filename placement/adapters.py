"""Where each supported MoE family keeps its experts (transformers 5.x).

All families below store a layer's routed experts fused in one module, `layer.mlp.experts`, with
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]` and `act_fn`, called as
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`. The router, the
attention, the norms and any shared expert stay as they are and count as non-expert weights; every
layer's attention projections (`layer.self_attn.{q,k,v,o}_proj`, nn.Linear, bias or not) may be
swapped for quantized ones (Plan.attn_bits).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from placement.spec import ModelSpec


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    top_k_attr: str = "num_experts_per_tok"
    note: str = ""
    attn_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # of layer.self_attn

    def attention_linears(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """(attention module, attribute) of every attention projection, layer by layer."""
        sites = []
        for layer in model.model.layers:
            attn = getattr(layer, "self_attn", None)
            for name in self.attn_projections:
                if isinstance(getattr(attn, name, None), nn.Linear):
                    sites.append((attn, name))
        return sites

    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(model layer index, MoE block) for every layer whose MLP routes to experts."""
        blocks = []
        for i, layer in enumerate(model.model.layers):
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if hasattr(experts, "gate_up_proj"):
                blocks.append((i, layer.mlp))
        return blocks

    def spec(self, model: nn.Module) -> ModelSpec:
        blocks = self.moe_blocks(model)
        if not blocks:
            raise ValueError(f"{self.model_type} model has no MoE layers with fused experts")
        experts = blocks[0][1].experts
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        expert_params = {id(b.experts.gate_up_proj) for _, b in blocks} | {
            id(b.experts.down_proj) for _, b in blocks
        }
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in expert_params}
        return ModelSpec(
            family=self.model_type,
            num_layers=len(blocks),
            num_experts=int(num_experts),
            top_k=int(getattr(model.config, self.top_k_attr)),
            hidden=int(hidden),
            intermediate=int(two_i) // 2,
            dtype=experts.gate_up_proj.dtype,
            nonexpert_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
            attn_linears=tuple((int(getattr(a, n).out_features), int(getattr(a, n).in_features))
                               for a, n in self.attention_linears(model)),
        )


ADAPTERS = {
    a.model_type: a
    for a in (
        FamilyAdapter("mixtral"),
        FamilyAdapter("qwen2_moe", note="the sigmoid-gated shared expert stays on the accelerator at 16 bits"),
        FamilyAdapter("qwen3_moe", note="dense layers listed in mlp_only_layers are not MoE layers"),
        FamilyAdapter("olmoe"),
    )
}


def adapter_for(config) -> FamilyAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model architecture {model_type!r}; supported MoE families: "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
