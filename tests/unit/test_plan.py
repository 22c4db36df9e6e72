"""`sheepop plan`: parameter counts, FLOPs, the activation model against real autograd, the fit
check and its suggestions, bad input. The memory model against real DeepSpeed engines on two
ranks: tests/integration/test_plan.py."""
from __future__ import annotations

import pytest
import torch

from sheepop import plan
from sheepop.cli import main as cli
from sheepop.config import compose
from sheepop.model.config import ModelConfig, checkpointed_layers
from sheepop.model.transformer import Transformer
from sheepop.train import activation_checkpointing
from tests.helpers import saved_bytes


def _cfg(*overrides: str):
    return compose(list(overrides))


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs


def test_llama_7b_plan_matches_hand_counts(capsys):
    assert cli(["plan", "model=llama-7b", "cluster.gpu=a100-80gb", "cluster.num_workers=8"]) == 0
    out = capsys.readouterr().out
    # Llama 2 7B by hand: per layer q,k,v,o 4·4096² + SwiGLU 3·4096·11008 + two norms 2·4096;
    # 32 layers, a final norm, untied 32000 × 4096 embedding and output head.
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    total = 32 * layer + 4096 + 2 * 32000 * 4096
    assert total == 6_738_415_616  # the published count
    assert f"{total:,} parameters" in out
    assert f"embedding {32000 * 4096:,}" in out and f"non-embedding {total - 32000 * 4096:,}" in out
    from sheepop.cli.plan import compose_for_plan

    cfg, note = compose_for_plan(["model=llama-7b", "cluster.gpu=a100-80gb", "cluster.num_workers=8"])
    s = plan.summary(cfg)
    t = cfg.trainer
    glob = t.global_batch_size or t.micro_batch_size * 8 * (t.grad_accum_steps or 1)
    # 6 × (matmul params: all but the input embedding) + 12 · layers · d · seq (attention scores).
    assert s["flops_per_token"] == 6 * (total - 32000 * 4096) + 12 * 32 * 4096 * 4096
    assert s["batch"].tokens_per_step == glob * 4096 and f"{glob * 4096:,} tokens per optimizer step" in out
    assert s["tokens"] == t.max_steps * glob * 4096
    # time = FLOPs / (8 GPUs × 312 TFLOP/s × 40% MFU)
    assert s["seconds"] == pytest.approx(s["flops_per_token"] * s["tokens"] / (8 * 312e12 * 0.4))
    assert "a100-80gb" in out and "GPU-hours" in out
    # bf16 (the default on GPUs): ZeRO-3 weights are 2 B/param split 8 ways; ZeRO-0 holds all of them,
    # and the 12 B/param of optimizer state (fp32 master + Adam m, v) is split 8 ways from ZeRO-1 on.
    assert "bf16, AdamW" in out
    assert s["memory"]["zero3"]["params"] == pytest.approx(2 * total / 8)
    assert s["memory"]["zero0"]["params"] == pytest.approx(2 * total)
    assert s["memory"]["zero0"]["optimizer"] == pytest.approx(12 * total)
    assert s["memory"]["zero1"]["optimizer"] == pytest.approx(12 * total / 8)


# ---------------------------------------------------------------------------------------------
# Activations vs what autograd saves


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
@pytest.mark.parametrize("precision", plan.MODES)
@pytest.mark.parametrize("shape", [
    dict(vocab_size=4096, d_model=384, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=1024),  # GQA, like small
    dict(vocab_size=2048, d_model=256, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=1536, tie_embeddings=False),
])
def test_activation_estimate_matches_autograd_saved_tensors(shape, precision, checkpointing):
    """With activation checkpointing: what the forward saves (checkpointed blocks: their inputs)
    plus what one block saves again while it is recomputed in backward."""
    args = ModelConfig(max_seq_len=256, activation_checkpointing=checkpointing, **shape)
    torch.manual_seed(0)
    model = Transformer(args)
    activation_checkpointing.apply(model, checkpointing, args.activation_checkpointing_every)
    ckpt = len(checkpointed_layers(args.n_layers, checkpointing, args.activation_checkpointing_every))
    if precision == "bf16":  # what DeepSpeed's bf16 mode does: parameters cast, buffers kept fp32
        for p in model.parameters():
            p.data = p.data.bfloat16()
    idx = torch.randint(0, args.vocab_size, (2, 256))
    measured = saved_bytes(model, idx, precision) + (saved_bytes(model, idx, precision, block=0) if ckpt else 0)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    block_matrices = sum(p.numel() for p in model.layers[0].parameters() if p.dim() >= 2)
    kept = matrices - max(ckpt - 1, 0) * block_matrices  # checkpointed blocks': one at a time, recomputing
    weight_copies = 2 * kept if precision == "bf16-autocast" else 0  # the plan counts these separately
    est = plan.activation_bytes(args, 2, 256, precision)["saved"]
    assert est == pytest.approx(measured - weight_copies, rel=0.1)


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
@pytest.mark.parametrize("precision", plan.MODES)
def test_document_mask_memory_matches_autograd_saved_tensors(precision, checkpointing):
    """data.document_mask: what the mask adds to the saved tensors (an additive seq × seq mask per
    layer that keeps activations, the boolean one as checkpointed blocks' input, per-window RoPE
    angles) is exactly what the plan adds (the rest: test_activation_estimate_matches_autograd_saved_tensors)."""
    from sheepop.data.loader import document_ids

    args = ModelConfig(max_seq_len=256, activation_checkpointing=checkpointing, vocab_size=4096, d_model=384,
                       n_layers=4, n_heads=6, n_kv_heads=2, d_ff=1024)
    torch.manual_seed(0)
    model = Transformer(args)
    activation_checkpointing.apply(model, checkpointing, args.activation_checkpointing_every)
    ckpt = len(checkpointed_layers(args.n_layers, checkpointing, args.activation_checkpointing_every))
    if precision == "bf16":
        for p in model.parameters():
            p.data = p.data.bfloat16()
    idx = torch.randint(8, args.vocab_size, (2, 256))
    idx[:, 40::50] = 7  # token 7 ends a document: six per window
    doc_ids = document_ids(idx, 7)

    def measured(**kw):
        return saved_bytes(model, idx, precision, **kw) + (saved_bytes(model, idx, precision, block=0, **kw) if ckpt else 0)

    est_off, est_on = (plan.activation_bytes(args, 2, 256, precision, document_mask=m)["saved"] for m in (False, True))
    assert est_on - est_off == measured(doc_ids=doc_ids) - measured()
    assert est_on > est_off + (args.n_layers - ckpt) * 2 * 256 * 256 * 2  # the seq² term: a layer's mask each


def test_plan_shows_less_activation_memory_with_checkpointing(capsys):
    base = ["model=llama-1b", "cluster.gpu=h100-80gb"]
    act = {mode: plan.summary(_cfg(*base, f"model.activation_checkpointing={mode}"))["chosen"]["activations"]
           for mode in ("none", "selective", "full")}
    assert act["full"] < act["selective"] < act["none"], act
    assert cli(["plan", *base, "model.activation_checkpointing=full"]) == 0
    assert "bf16, AdamW, activation checkpointing full)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Fit check and suggestions


@pytest.mark.parametrize("base", [
    ["model=llama-7b", "cluster.gpu=a100-80gb", "cluster.num_workers=8", "trainer.global_batch_size=128"],
    ["model=llama-1b", "model.max_seq_len=2048", "cluster.gpu=a100-40gb", "cluster.num_workers=4", "trainer.global_batch_size=0",
     "trainer.grad_accum_steps=1", "trainer.micro_batch_size=4", "parallelism=ddp"],
])
def test_check_fits_refuses_and_its_suggestions_fit(base):
    cfg = _cfg(*base)
    ok, msg = plan.check_fits(cfg)
    assert not ok and msg.startswith("does not fit") and "would fit:" in msg
    suggestions = msg.split("would fit: ", 1)[1].split(" | ")
    for s in suggestions:  # every suggestion, applied, is a valid config that fits
        ok2, msg2 = plan.check_fits(compose([*base, *s.split()]))
        assert ok2, (s, msg2)
    ok, msg = plan.check_fits(compose(["model=tiny", "cluster=process"]))
    assert ok and msg.startswith("fits")


def test_bigger_gpu_count_is_suggested_when_weights_do_not_fit():
    # llama-7b at micro batch 1 on one 24 GB L4: only sharding across GPUs (or offload) helps.
    cfg = _cfg("model=llama-7b", "cluster.gpu=l4", "trainer.micro_batch_size=1", "model.max_seq_len=512",
               "parallelism=zero3")
    ok, msg = plan.check_fits(cfg)
    assert not ok
    assert "cluster.num_workers=" in msg or "offload" in msg


def test_offload_moves_optimizer_to_cpu():
    args = _cfg("model=small").model
    on_gpu = plan.memory(args, stage=2, world=4, micro=1, seq=256)
    off = plan.memory(args, stage=2, world=4, micro=1, seq=256, offload_optimizer=True)
    assert off["optimizer"] == 0 and off["cpu"] >= on_gpu["optimizer"]
    assert off["total"] < on_gpu["total"]


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("argv, needle", [
    (["plan", "cluster.gpu=b9000"], "cluster.gpu=b9000: unknown GPU type; valid: h100-80gb"),
    (["plan", "mfu=2"], "cluster.mfu=2"),  # the short spelling is cluster.mfu, validated like any key
    (["plan", "cluster.mfu=0"], "must be in (0, 1]"),
    (["plan", "model=nope"], "model=nope: no such model preset"),
])
def test_bad_input_is_one_line(capsys, argv, needle):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
