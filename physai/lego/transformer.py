"""A BERT-style encoder for LEGO sentences, the attention patterns of the LEGO study's "mimicking" initialisation,
and attention diagnostics (imports torch; ``physai.lego`` itself does not).

- :class:`LegoEncoder`: token + learned position embeddings, ``n_layers`` encoder blocks (post-LN as in BERT,
  Devlin et al. 2019, or pre-LN, Xiong et al. 2020), optionally one block shared by all layers (ALBERT, Lan et al.
  2020), and a linear |G|-way classifier read at each variable's left-hand-side token (``LegoBatch.positions``),
  as the LEGO study's code reads ``pred[:, 1:-1:5]`` (Zhang et al. 2022, arXiv 2206.04301).
- :func:`manipulation_pattern`, :func:`association_pattern`, :func:`mimicking_loss`: the targets and the KL loss of
  the study's attention pre-training (its ``generate_mimicking_data`` and ``pre_train``).
- :func:`attention_mass`: per layer and head, the attention mass on identical tokens and on the local band.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from physai._checks import check_choice, check_float, check_int

NORMS = ("post", "pre")
MANIPULATION_WEIGHTS = (1.0, 2.0, 4.0, 2.0, 1.0)  # offsets -2..+2 around the diagonal, the study's "gauss_filt"
SMOOTHING = 1e-3  # added to targets and to the model's maps before normalising, as in the study's code


class EncoderBlock(nn.Module):
    """Multi-head self-attention and a GELU feed-forward layer, each in a residual branch with LayerNorm after
    (``"post"``, BERT) or before (``"pre"``) the branch. Attention is computed explicitly so that its weights can be
    returned: ``softmax(q k^T / sqrt(d_head))`` (Vaswani et al. 2017, eq. 1) per head."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm: str, dropout: float):
        super().__init__()
        self.n_heads, self.norm = n_heads, norm
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model, eps=1e-12), nn.LayerNorm(d_model, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [B, T, d], weights [B, H, T, T]) of self-attention on x [B, T, d]; the weights are those before
        attention dropout (rows sum to 1)."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads), dim=-1)
        context = (self.dropout(weights) @ v).transpose(1, 2).reshape(B, T, d)
        return self.out(context), weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm == "pre":
            attended, weights = self.attention(self.norm1(x))
            x = x + self.dropout(attended)
            return x + self.dropout(self.ff(self.norm2(x))), weights
        attended, weights = self.attention(x)
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.ff(x))), weights


class LegoEncoder(nn.Module):
    """BERT-style encoder with a classifier at chosen token positions.

    Parameters
    ----------
    vocab_size : number of token ids (``len(task.vocab)``).
    max_len : longest sequence (``task.sequence_length``, 5 n + 2).
    n_classes : classes of the head (``task.group.order``: a |G|-way prediction of each variable's value).
    d_model, n_layers, n_heads, d_ff : width, depth, heads (``d_model`` must be a multiple) and feed-forward width.
    norm : ``"post"`` (BERT: LayerNorm after each residual sum and on the embeddings) or ``"pre"`` (LayerNorm before
        each branch and once at the end).
    tied : one block applied ``n_layers`` times (ALBERT's cross-layer sharing) instead of ``n_layers`` blocks.
    dropout : dropout rate on embeddings, attention weights and residual branches (BERT uses 0.1).
    init_std : standard deviation of the normal initialisation of weights and embeddings (BERT: 0.02); biases 0,
        LayerNorm scales 1.

    Raises ``ValueError``/``TypeError`` naming a bad argument.
    """

    def __init__(self, vocab_size: int, max_len: int, n_classes: int, *, d_model: int = 64, n_layers: int = 3,
                 n_heads: int = 4, d_ff: int | None = None, norm: str = "pre", tied: bool = False,
                 dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("n_classes", n_classes),
                            ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
            check_int(value, name, min=1)
        d_ff = 4 * d_model if d_ff is None else check_int(d_ff, "d_ff", min=1)
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        check_choice(norm, "norm", NORMS)
        if not isinstance(tied, bool):
            raise TypeError(f"tied: expected a bool, got {type(tied).__name__}")
        if not 0 <= check_float(dropout, "dropout") < 1:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout}")
        check_float(init_std, "init_std", positive=True)
        self.n_layers, self.n_heads, self.norm, self.tied, self.max_len = n_layers, n_heads, norm, tied, max_len
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.embedding_norm = nn.LayerNorm(d_model, eps=1e-12) if norm == "post" else nn.Identity()
        self.final_norm = nn.LayerNorm(d_model, eps=1e-12) if norm == "pre" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff, norm, dropout)
                                    for _ in range(1 if tied else n_layers))
        self.head = nn.Linear(d_model, n_classes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *, need_attention: bool = False):
        """Logits of the classifier.

        tokens : [B, T] int64 token ids, T <= max_len.
        positions : [B, n] int64 token indices to read the classifier at (``LegoBatch.positions``), or None for
            every token.
        Returns logits [B, n, n_classes] ([B, T, n_classes] without positions), float32; with ``need_attention``
        a pair (logits, attention [B, n_layers, n_heads, T, T]) whose rows sum to 1.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape [B, T], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens: expected at most max_len={self.max_len} tokens, got {tokens.shape[1]}")
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.dropout(self.embedding_norm(x))
        maps = []
        for layer in range(self.n_layers):
            x, weights = self.blocks[0 if self.tied else layer](x)
            maps.append(weights)
        x = self.final_norm(x)
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        logits = self.head(x)
        return (logits, torch.stack(maps, dim=1)) if need_attention else logits


def manipulation_pattern(seq_len: int, *, device=None) -> torch.Tensor:
    """The study's banded "manipulation" target [T, T] (float32): row i puts weights 1, 2, 4, 2, 1 on columns
    i-2 .. i+2 (those inside the sequence), adds 1e-3 everywhere and is normalised to sum 1."""
    seq_len = check_int(seq_len, "seq_len", min=1)
    offset = torch.arange(seq_len, device=device)[None, :] - torch.arange(seq_len, device=device)[:, None]
    pattern = torch.full((seq_len, seq_len), SMOOTHING, device=device)
    for delta, weight in zip(range(-2, 3), MANIPULATION_WEIGHTS):
        pattern += weight * (offset == delta)
    return pattern / pattern.sum(-1, keepdim=True)


def association_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """The study's "association" target [B, T, T] (float32) for tokens [B, T]: position i attends uniformly to the
    other positions holding the same token id (itself excluded), plus 1e-3 everywhere, rows normalised (a token
    with no twin gets the uniform row)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected shape [B, T], got {tuple(tokens.shape)}")
    same = tokens[:, :, None] == tokens[:, None, :]
    same &= ~torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)
    pattern = same.float() + SMOOTHING
    return pattern / pattern.sum(-1, keepdim=True)


def mimicking_loss(attention: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(manipulation, association) losses of the study's attention pre-training: for every layer, KL(p || target)
    between head 0's map and :func:`manipulation_pattern`, and between head 1's map and
    :func:`association_pattern`, where p is the map plus 1e-3, renormalised; each KL is summed over keys, averaged
    over sentences and query positions, and summed over layers.

    attention : [B, L, H, T, T] (H >= 2), as :class:`LegoEncoder` returns it; tokens : [B, T].
    """
    if attention.ndim != 5 or attention.shape[2] < 2:
        raise ValueError(f"attention: expected shape [B, L, H >= 2, T, T], got {tuple(attention.shape)}")
    smoothed = attention[:, :, :2] + SMOOTHING
    smoothed = smoothed / smoothed.sum(-1, keepdim=True)
    targets = (manipulation_pattern(tokens.shape[1], device=tokens.device)[None, None],
               association_pattern(tokens)[:, None])
    return tuple((smoothed[:, :, h] * (smoothed[:, :, h] / targets[h]).log()).sum(-1).mean((0, 2)).sum()
                 for h in range(2))


def attention_mass(attention: torch.Tensor, tokens: torch.Tensor, band: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(identical [L, H], local [L, H]) float64: the attention mass that each layer and head puts on other positions
    holding the same token id, and on keys within ``band`` positions of the query (the manipulation pattern's
    support), averaged over sentences and query positions.

    attention : [B, L, H, T, T]; tokens : [B, T].
    """
    band = check_int(band, "band", min=0)
    T = tokens.shape[1]
    same = (tokens[:, :, None] == tokens[:, None, :]) & ~torch.eye(T, dtype=torch.bool, device=tokens.device)
    offset = torch.arange(T, device=tokens.device)
    near = (offset[None, :] - offset[:, None]).abs() <= band
    attention = attention.double()
    identical = (attention * same[:, None, None]).sum(-1).mean((0, 3))
    local = (attention * near).sum(-1).mean((0, 3))
    return identical, local
