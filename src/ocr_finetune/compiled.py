"""Regional torch.compile: every layer of a tower compiled in place, one graph per layer class.

Why layers and not the whole model: the model splices image features into the text at data-dependent
positions and sees a new padded length every batch; a layer repeats 12-24 times with one compiled graph,
compiles in seconds, and stays inside transformers' gradient checkpointing (the backward pass recomputes
the compiled layer). What it buys is fusion: the vision towers spend most of their time in elementwise and
copy kernels (layer norms, residual adds, SAM's window partition and its attention's q/k concatenation;
benchmarks/results/profile_step_*.json), which inductor merges into few kernels.

Shapes: the first (batch) dimension is dynamic, since the number of tiles changes from batch to batch. The
other dimensions of a vision layer's input are static: there are two (the 1024px global view and the tiles),
and symbolic grid sizes make inductor fail on the fused SAM attention's padding arithmetic (torch 2.11).
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

SCOPES = {"vision": ("vision_tower",), "llm": ("language_model",), "all": ("vision_tower", "language_model")}
_CLASSES: dict[tuple[type, bool], type] = {}


def _compiled_class(cls: type, static_dims: bool) -> type:
    key = (cls, static_dims)
    if key not in _CLASSES:
        inner = torch.compile(cls.forward.__wrapped__)  # the layer's own forward, without the checkpoint wrapper

        def forward(self, hidden_states, *args, **kwargs):
            torch._dynamo.maybe_mark_dynamic(hidden_states, 0)
            if static_dims:
                for dim in range(1, hidden_states.dim()):
                    torch._dynamo.mark_static(hidden_states, dim)
            return inner(self, hidden_states, *args, **kwargs)

        # A subclass gets transformers' checkpoint wrapper around this forward (GradientCheckpointingLayer's
        # __init_subclass__), so checkpointing works as before, now around the compiled layer.
        _CLASSES[key] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _CLASSES[key]


def compile_layers(model, scope: str) -> int:
    """Compile every transformer layer under the towers of `scope` (`vision`, `llm` or `all`). Returns the
    count."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r} (allowed values: {', '.join(SCOPES)})")
    # each layer class compiles once per grid size, grad mode and layer variant (windowed or global)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    changed = 0
    for name, module in model.named_modules():
        path = f".{name}."
        if isinstance(module, GradientCheckpointingLayer) and any(f".{t}." in path for t in SCOPES[scope]):
            if type(module) in _CLASSES.values():  # compiled already
                continue
            module.__class__ = _compiled_class(type(module), static_dims=".vision_tower." in path)
            changed += 1
    return changed
