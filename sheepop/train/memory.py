"""Bytes a rank holds in a DeepSpeed engine, measured from its tensors (not from a formula).

Each storage is counted once: model weights (ZeRO-3: the rank's ds_tensor partitions), gradients
(param .grad and ZeRO's gradient partitions), optimizer state (AdamW's moments plus the fp32 master
weights, also reported apart). In DeepSpeed's bf16 mode the master is the optimizer's fp32 copy of
the bf16 weights (full at stage 0, the rank's partition at stages 1-3); with fp32 weights
(precision=fp32 or bf16-autocast) stage 0 has none and stages 1-3 keep an fp32 copy of the
rank's partition beside the fp32 weights. Used by bench/zero_memory.py and the plan's test.
"""
from __future__ import annotations

import torch


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def engine_bytes(engine) -> dict[str, int]:
    opt = engine.optimizer
    params = _storages(getattr(p, "ds_tensor", p.data) for p in engine.module.parameters())
    grads = [p.grad for p in engine.module.parameters()]
    ag = getattr(opt, "averaged_gradients", None)
    if isinstance(ag, dict):
        grads += [t for v in ag.values() if v for t in (v if isinstance(v, list) else [v])]
    grads += [getattr(opt, "grads_in_partition", None), getattr(opt, "grad_partitions_flat_buffer", None)]
    masters = list(getattr(opt, "single_partition_of_fp32_groups", None) or []) + \
        list(getattr(opt, "fp32_partitioned_groups_flat", None) or []) + \
        [t for g in getattr(opt, "fp32_groups", None) or [] for t in g]  # stage 0 in bf16 mode: the full copy
    grads += [m.grad for m in masters]
    grads = {k: v for k, v in _storages(grads).items() if k not in params}
    inner = getattr(opt, "optimizer", opt)
    states = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    moments = {k: v for k, v in _storages(states).items() if k not in params and k not in grads}
    master = {k: v for k, v in _storages(masters).items() if k not in params and k not in grads and k not in moments}
    return {"params": sum(params.values()), "grads": sum(grads.values()),
            "optimizer": sum(moments.values()) + sum(master.values()),  # what the plan models
            "adam_moments": sum(moments.values()),  # AdamW's exp_avg and exp_avg_sq
            "fp32_master": sum(master.values())}  # ZeRO's fp32 copy of this rank's partition
