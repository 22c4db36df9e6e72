"""data.document_mask: attention within a document, RoPE positions restarting at each document,
and, with it off (doc_ids None), today's forward unchanged. CPU, fp32, a tiny model."""
from __future__ import annotations

import torch

from sheepop.config import compose
from sheepop.data.loader import document_ids
from sheepop.data.shards import fingerprint
from sheepop.model.config import ModelConfig
from sheepop.model.transformer import Transformer, document_attention
from sheepop.train import activation_checkpointing
from tests.helpers import TINY_DATA

ARGS = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=64,
                   init_std=0.2)
EOT = 0


def _model(mode: str = "none") -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    activation_checkpointing.apply(model, mode, 1)
    return model.eval()


def _window():
    """(1, 40) window: the tail of document A (ending with EOT), all of B (EOT), the head of C;
    and the slice of B's tokens (its EOT included)."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(1, ARGS.vocab_size, (n,), generator=g) for n in (11, 15, 12))
    eot = torch.tensor([EOT])
    x = torch.cat([a, eot, b, eot, c])[None]
    return x, slice(12, 28)


def test_document_ids_of_a_hand_made_window():
    x = torch.tensor([[5, EOT, 7, 8, EOT, EOT, 9],
                      [EOT, 3, 3, 3, 3, 3, 3]])
    # an EOT closes its document: it keeps the id of the tokens before it
    assert document_ids(x, EOT).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    positions, mask = document_attention(document_ids(x, EOT))
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    assert mask.shape == (2, 1, 7, 7)
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False, False]


def test_other_documents_do_not_change_a_documents_logits():
    m = _model()
    x, b = _window()
    x2 = x.clone()
    x2[:, :11] = (x2[:, :11] + 7) % (ARGS.vocab_size - 1) + 1  # document A's tokens, not its EOT
    with torch.no_grad():
        on = m(x, doc_ids=document_ids(x, EOT)), m(x2, doc_ids=document_ids(x2, EOT))
        off = m(x), m(x2)
    assert (on[0][:, b] - on[1][:, b]).abs().max().item() <= 1e-6
    assert (off[0][:, b] - off[1][:, b]).abs().max().item() > 1e-3  # plain causal attention sees A


def test_a_document_in_a_window_equals_the_document_alone():
    m = _model()
    x, b = _window()
    with torch.no_grad():
        packed = m(x, doc_ids=document_ids(x, EOT))[:, b]
        alone = m(x[:, b])  # its own sequence: positions 0, 1, ...
    # RoPE scores depend only on key-query offsets, so without restarting positions the mask alone
    # differs from this only by rounding (5e-6 here); with the restart the numbers are the same.
    assert (packed - alone).abs().max().item() <= 1e-6


def test_without_doc_ids_the_forward_is_todays():
    m = _model()
    x, _ = _window()
    with torch.no_grad():
        today = m(x)
        assert torch.equal(m(x, doc_ids=None), today)
        one_doc = m(x, doc_ids=torch.zeros_like(x))  # one document: the mask is the causal one
    assert (one_doc - today).abs().max().item() <= 1e-6


def test_activation_checkpointing_gives_the_same_gradients_under_the_mask():
    x, _ = _window()
    doc_ids = document_ids(x, EOT)
    grads = []
    for mode in ("none", "full"):
        m = _model(mode).train()
        m(x, x.roll(-1, dims=1), doc_ids=doc_ids).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max().item() <= 1e-6, name


def test_the_flag_leaves_the_prepared_data_as_it_is():
    """The shards are the same either way: turning it on reuses data prepared without it."""
    base = ["model=tiny", *TINY_DATA]
    assert fingerprint(compose(base)) == fingerprint(compose([*base, "data.document_mask=true"]))


def test_mfu_counts_the_attention_the_document_mask_leaves():
    """A window of documents of lengths 3, 2, 3 (T = 8) has 9 + 4 + 9 = 22 query-key pairs where an
    unmasked window has 64: its attention span is 22 / 8; a single-document window keeps T."""
    from sheepop.model.transformer import document_attended, flops_per_token

    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert document_attended(ids[:1]) == 22 / 8 and document_attended(ids[1:]) == 8
    assert document_attended(ids) == (22 / 8 + 8) / 2
    assert document_attended(document_ids(torch.tensor([[5, EOT, 7, 7, EOT, 1]]), EOT)) == (4 + 9 + 1) / 6
    full = flops_per_token(ARGS, 8)
    assert flops_per_token(ARGS, 8, attended=8.0) == full
    assert full - flops_per_token(ARGS, 8, attended=22 / 8) == 12 * ARGS.n_layers * ARGS.d_model * (8 - 22 / 8)
