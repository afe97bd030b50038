"""torch.compile per transformer block (as torchtitan does): identical blocks share one
compiled graph, compile time stays flat with depth, and state-dict keys are unchanged. The
output layer's loss is compiled too: fused, its log-softmax and backward cost a third less
(with per-block compile and fused AdamW, the tiny model's step on the CPU is 1.2-1.3x the
eager one: benchmarks/bench_train.py KILN_BENCH_HF=1).

A backend whose parameter gathering runs in hooks dynamo cannot trace (ZeRO-3's hooks are
``torch.compiler.disable``d) would break every compiled block at each submodule: 36 graph
breaks and 18 graphs for the tiny model's two blocks, against 0 and 2 elsewhere. There the
blocks are made ZeRO-3 leaf modules (the backend gathers a block's parameters in one hook
on the block, as FSDP does) and only their ``forward`` is compiled, so the hook runs eagerly
around one graph; the loss stays eager, since it calls the output layer, whose gathering
hook would break it. DeepSpeed's own route, ``engine.compile()``, compiles the whole module
through the same hooks (40 breaks, 20 graphs here), and DeepCompile, which removes them,
builds CUDA-only kernels. tests/test_compile_graphs.py counts the graphs and breaks on
every backend.
"""

from __future__ import annotations

import torch


def compile_blocks(model: torch.nn.Module, outside_hooks: bool = False) -> None:
    """Compile ``model`` in place, before the backend wraps it; ``outside_hooks``: the
    backend's ``compile_outside_hooks``."""
    if outside_hooks:
        for block in model.layers:
            block.forward = torch.compile(block.forward)
        return
    for block in model.layers:
        block.compile()
    model.loss_fn = torch.compile(model.loss_fn)
