"""The layers of the text models, over one tensor that every block hands to the next.

A sequence state is (N, T + R, F + 1): the F features of each of T positions, and last the
padding mask (1 for a token, 0 for padding), so that every block and every bridge knows
which positions are real. An LSTM block that hands on its final (h, c) appends them as
R = 2 rows after the T positions (directions side by side, mask 0): one tensor still
travels between blocks, which is all the pipeline moves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD = 0
STATE_ROWS = 2  # the rows of h and c after the positions


def split(state: Tensor) -> tuple[Tensor, Tensor]:
    """(features, mask) of a sequence state."""
    return state[..., :-1], state[..., -1:]


def _join(features: Tensor, mask: Tensor) -> Tensor:
    return torch.cat([features, mask], dim=-1)


def append_final_state(state: Tensor, h: Tensor, c: Tensor) -> Tensor:
    """The state with (h, c), each (directions, N, H), as two rows after the positions."""
    n, width = state.shape[0], h.shape[0] * h.shape[2]  # the width spelled out: N may be 0
    rows = torch.stack([h.transpose(0, 1).reshape(n, width), c.transpose(0, 1).reshape(n, width)], dim=1)
    return torch.cat([state, _join(rows, rows.new_zeros(n, STATE_ROWS, 1))], dim=1)


def take_final_state(state: Tensor, directions: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(the state without its two state rows, (h, c) each (directions, N, H))."""
    n = state.shape[0]
    rows = state[:, -STATE_ROWS:, :-1]
    width = rows.shape[-1] // directions  # spelled out: N may be 0
    h, c = (rows[:, i].reshape(n, directions, width).transpose(0, 1).contiguous() for i in range(STATE_ROWS))
    return state[:, :-STATE_ROWS], (h, c)


class TokenEmbedding(nn.Module):
    """Token ids (N, T) -> sequence state. With ``max_len``, learned position embeddings are
    added (for attention, which has no order of its own). With ``mask_padding`` the padding
    id has no embedding of its own (its positions are zeros); without it (as the ICLR 2022
    code) padding is a token like any other, whose embedding is learned."""

    def __init__(self, vocab_size: int, dim: int, max_len: int | None = None, mask_padding: bool = True) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD if mask_padding else None)
        self.positions = nn.Embedding(max_len, dim) if max_len else None
        self.mask_padding = mask_padding

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != PAD).unsqueeze(-1).to(self.tokens.weight.dtype)
        h = self.tokens(ids)
        if self.positions is not None:
            if ids.shape[1] > self.positions.num_embeddings:
                raise ValueError(f"sequences of {ids.shape[1]} tokens exceed max_len {self.positions.num_embeddings}")
            h = h + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return _join(h * mask if self.mask_padding else h, mask)


class SequenceLSTM(nn.Module):
    """One LSTM layer (both directions if ``bidirectional``) over the sequence state.

    ``input_has_state``: the block before appended its final (h, c), which are stripped, and
    with ``use_input_state`` start this LSTM (the ICLR 2022 code's hand-over). ``output_state``:
    append this LSTM's final (h, c). With ``skip_padding`` padding never reaches a real
    position or a final state (the sequence is packed where it would: read backwards or to
    its end); without it the LSTM reads the padding as the ICLR 2022 code does.
    """

    def __init__(self, in_dim: int, hidden: int, bidirectional: bool = False, input_has_state: bool = False,
                 use_input_state: bool = False, output_state: bool = False, skip_padding: bool = True) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.directions = 2 if bidirectional else 1
        self.input_has_state, self.use_input_state = input_has_state, use_input_state and input_has_state
        self.output_state, self.skip_padding = output_state, skip_padding

    def forward(self, state: Tensor) -> Tensor:
        start = None
        if self.input_has_state:
            state, start = take_final_state(state, self.directions)
            start = start if self.use_input_state else None
        x, mask = split(state)
        if self.skip_padding and (self.directions == 2 or self.output_state) and x.shape[0] > 0:  # none to pack
            out, (h, c) = self._packed(x, mask, start)
        else:  # a forward pass alone never carries padding (at the end) into a real position
            out, (h, c) = self.lstm(x, start)
        out = _join(out * mask if self.skip_padding else out, mask)
        return append_final_state(out, h, c) if self.output_state else out

    def _packed(self, x: Tensor, mask: Tensor, start: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        lengths = mask[..., 0].sum(dim=1).clamp_min(1).to(device="cpu", dtype=torch.long)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed, start)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, (h, c)


class SequenceMean(nn.Module):
    """A sequence state's mean over positions -> (N, F): over the real positions with
    ``skip_padding``, over every position without it (the ICLR 2022 code's embedding block);
    never over appended state rows."""

    def __init__(self, skip_padding: bool = True, state_rows: int = 0) -> None:
        super().__init__()
        self.skip_padding, self.state_rows = skip_padding, state_rows

    def forward(self, state: Tensor) -> Tensor:
        h, mask = split(state[:, : state.shape[1] - self.state_rows])
        if not self.skip_padding:
            return h.mean(dim=1)
        return (h * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class FinalStatePool(nn.Module):
    """The final hidden state an LSTM block appended, summed over its directions -> (N, H),
    the ICLR 2022 code's bridge input."""

    def __init__(self, directions: int) -> None:
        super().__init__()
        self.directions = directions

    def forward(self, state: Tensor) -> Tensor:
        h = state[:, -STATE_ROWS, :-1]
        return h.reshape(h.shape[0], self.directions, h.shape[1] // self.directions).sum(dim=1)  # N may be 0


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    """F.scaled_dot_product_attention, run in float32 where q is bf16 or fp16 on the CPU: there
    torch's attention (its backward most) is 2.5-3x slower in bf16 than in float32
    (benchmarks/RESULTS.md), and float32 only adds precision. The result has q's dtype."""
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False):
        mask = mask.float() if mask.is_floating_point() else mask
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p)
    return out.to(q.dtype)


class MaskedTransformerLayer(nn.Module):
    """torch's Transformer encoder layer (post-norm, or pre-norm if ``self.layer.norm_first``),
    its attention skipping padded positions.

    The weights are nn.TransformerEncoderLayer's (``self.layer``, so its state_dict keys and
    initialisation); where autograd records, the forward pass is its own. torch's layer
    splits the packed query, key and value projection with three selects, whose backward
    passes each fill a zero tensor of all three and add them up, and first copies the
    projection into another layout. Here one unbind splits a view of the projection, whose
    backward is one stack: a training step of the layer runs 1.10-1.11x faster at width 128
    (benchmarks/transformer_layer.py). The arithmetic and the order of dropout draws are
    torch's. Inference without autograd calls torch's layer, for its fused kernel, and so
    does every call while hooks sit on the layer or its attention (pruning's, for one),
    which the own forward pass would skip.
    """

    def __init__(self, dim: int, heads: int, feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, feedforward, dropout=dropout, batch_first=True)

    def forward(self, state: Tensor) -> Tensor:
        h, mask = split(state)
        padding = mask[..., 0] == 0
        padding[:, 0] = False  # an all-padding row would make attention 0/0
        if (self.training or torch.is_grad_enabled()) and not self._hooked():
            out = self._encoder_layer(h, padding)
        else:
            out = self.layer(h, src_key_padding_mask=padding)
        return _join(out * mask, mask)

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in (self.layer, self.layer.self_attn))

    def _encoder_layer(self, x: Tensor, padding: Tensor) -> Tensor:
        layer = self.layer
        if layer.norm_first:
            x = x + layer.dropout1(self._attention(layer.norm1(x), padding))
            return x + self._feedforward(layer.norm2(x))
        x = layer.norm1(x + layer.dropout1(self._attention(x, padding)))
        return layer.norm2(x + self._feedforward(x))

    def _feedforward(self, x: Tensor) -> Tensor:
        layer = self.layer
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))

    def _attention(self, x: Tensor, padding: Tensor) -> Tensor:
        attention = self.layer.self_attn
        n, t, d = x.shape
        heads = attention.num_heads
        qkv = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).view(n, t, 3, heads, d // heads)
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))
        keep = ~padding.view(n, 1, 1, t)
        out = attend(q, k, v, keep, attention.dropout if attention.training else 0.0)
        # out_proj in torch's (T, N) row order, as its layer does: dropout1 then draws its
        # mask over the same memory layout
        out = F.linear(out.permute(2, 0, 1, 3).reshape(t * n, d), attention.out_proj.weight, attention.out_proj.bias)
        return out.view(t, n, d).transpose(0, 1)


class StdLayerNorm(nn.Module):
    """The ICLR 2022 code's LayerNorm: a (x - mean) / (std + eps) + b, std unbiased."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.a, self.b, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        return self.a * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.b


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections;
    padded keys get a score of -1e9 (as the ICLR 2022 code), so a row of padding alone
    still has a defined (uniform) attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.dropout = heads, dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (proj(x).view(n, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        bias = (mask[..., 0] == 0).to(x.dtype).mul(-1e9).view(n, 1, 1, t)
        out = attend(q, k, v, bias, self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(n, t, d))


class PreNormEncoderLayer(nn.Module):
    """The ICLR 2022 code's encoder layer: x + drop(attn(norm(x))), then x + drop(ff(norm(x)))
    with ff = Linear, ReLU, dropout, Linear."""

    def __init__(self, dim: int, heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.attention, self.norm1 = SelfAttention(dim, heads, dropout), StdLayerNorm(dim)
        self.feedforward = nn.Sequential(nn.Linear(dim, feedforward), nn.ReLU(), nn.Dropout(dropout),
                                         nn.Linear(feedforward, dim))
        self.norm2, self.drop = StdLayerNorm(dim), nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.attention(self.norm1(x), mask))
        return x + self.drop(self.feedforward(self.norm2(x)))


class PreNormTransformer(nn.Module):
    """The ICLR 2022 code's TransformerEncoder over the sequence state: ``layers`` pre-norm
    layers and a closing LayerNorm, every weight matrix Xavier-uniform (its reset_parameters)."""

    def __init__(self, dim: int, heads: int, feedforward: int, layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PreNormEncoderLayer(dim, heads, feedforward, dropout) for _ in range(layers))
        self.norm = StdLayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, state: Tensor) -> Tensor:
        h, mask = split(state)
        for layer in self.layers:
            h = layer(h, mask)
        return _join(self.norm(h) * mask, mask)


def check_heads(dim: int, heads: int) -> None:
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")

