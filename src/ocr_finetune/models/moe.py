"""Routed experts at every batch size: a transformers experts implementation that picks its kernel by the
number of tokens.

Why this exists: `generate()` switches `grouped_mm` experts to transformers' `batched_mm` for decoding, and
`batched_mm` gathers a copy of one expert's weights for every (token, expert) pair (6.9 MB each for
DeepSeek-OCR's experts). At batch 64 a decode step gathers 2.6 GB per MoE layer: 12-18 ms of a 34 ms step on
an H100 (benchmarks/results/profile_decode_steps_h100_b64.json). `grouped_mm` avoids the copies but was
slower still at decode sizes (speed_h100_decode_grouped_mm.json). From a few tokens to a few hundred, the
cheapest plan is to run every expert on every token and keep, for each token, the outputs of the experts it
was routed to: each expert's weights are read once per step (at batch 64 nearly every expert is routed to
anyway), and the extra multiply-adds are nearly free while a decode step is memory-bound. No library
switches between these plans by size, so this module does.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import (ALL_EXPERTS_FUNCTIONS, batched_mm_experts_forward,
                                           grouped_mm_experts_forward)

NAME = "ocr_finetune_adaptive"
# Above this many tokens the dense plan's wasted work (num_experts / top_k times the useful FLOPs) outweighs
# reading the weights once; prefill and training have thousands of tokens and take grouped_mm.
DENSE_MAX_TOKENS = 256
# batched_mm copies the weights of each routed (token, expert) pair; the dense plan reads every expert once.
# Copies win below half a route per expert: measured on an H100 for DeepSeek-OCR-2 (64 experts, top 6),
# batched_mm 3.4 ms/step at batch 1 against dense 4.7, even at batch 4, dense 5.4 against 7.3 at batch 8
# (benchmarks/results/speed_h100_modes_and_decode_defaults.json).
BATCHED_MM_MAX_ROUTES_PER_EXPERT = 0.5


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token; then each token's routed outputs, summed with their routing weights."""
    gate_up, down = self.gate_up_proj, self.down_proj
    if not self.is_transposed:  # stored (experts, out, in); matmul wants (experts, in, out)
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    hidden = self._apply_gate(torch.matmul(hidden_states, gate_up))  # (experts, tokens, intermediate)
    out = torch.bmm(hidden, down)  # (experts, tokens, hidden)
    tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device)[:, None]
    routed = out[top_k_index, tokens]  # (tokens, top_k, hidden): unrouted outputs are never read
    return (routed.float() * top_k_weights.float()[..., None]).sum(1).to(hidden_states.dtype)


def experts_plan(tokens: int, top_k: int, num_experts: int) -> str:
    """Which kernel `adaptive_experts_forward` runs for this many tokens: batched_mm, dense or grouped_mm."""
    if tokens > DENSE_MAX_TOKENS:
        return "grouped_mm"
    if tokens * top_k < BATCHED_MM_MAX_ROUTES_PER_EXPERT * num_experts:
        return "batched_mm"
    return "dense"


def adaptive_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    tokens, top_k = top_k_index.shape
    simple = self.has_gate and not (self.has_bias or self.has_post_expert_norm or self._is_expert_parallel)
    plan = experts_plan(tokens, top_k, self.num_experts) if simple else "grouped_mm"
    if plan == "grouped_mm":
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if plan == "batched_mm":
        return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return dense_experts_forward(self, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(NAME, adaptive_experts_forward)


def use_adaptive_experts(model) -> None:
    """Route every MoE layer of `model` through `adaptive_experts_forward` (and keep `generate()` from
    switching it to `batched_mm`, which it does only for `grouped_mm`)."""
    model.set_experts_implementation(NAME)
