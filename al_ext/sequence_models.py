"""The text models of ICLR 2022 as AL blocks: LSTM_AL and Transformer_AL over token ids
(0 = padding), on the sequence state of al_ext.sequence_layers.

By default (al_ext.presets.al_ext_lstm, al_ext_transformer) the embedding sits inside the
first block and padding never changes a result; ``preset="iclr22"`` builds the authors'
released architecture (al_ext.presets.iclr22_lstm, iclr22_transformer): the embedding as a
block of its own, bidirectional LSTMs that hand their final (h, c) on, or pre-norm
attention blocks, and the tanh label side.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from . import presets
from .initialisation import Init, initialise
from .label_side import LabelSide
from .nn import ALBlock, AssociatedLearning, Backend
from .reference import AE_LOSSES, AELoss, Variant
from .sequence_layers import (
    STATE_ROWS,
    FinalStatePool,
    MaskedTransformerLayer,
    PreNormTransformer,
    SequenceLSTM,
    SequenceMean,
    TokenEmbedding,
    check_heads,
)
from .validation import check_choice, check_positive_int, check_widths

LSTM_BRIDGE_INPUTS: tuple[str, ...] = ("mean", "final_state")
ENCODER_LAYERS: tuple[str, ...] = ("torch", "iclr22")
# What a bridge reads: how it makes the block's sequence state a vector, and that vector's size.
BridgeInput = tuple[nn.Module, int]


class _SequenceAL(AssociatedLearning):
    """Blocks over token sequences from x-side encoders and what each bridge reads; the label
    side and bridges as ``o`` (the resolved preset options) describes them. ``init`` applies
    to the label side and bridges; embeddings, LSTMs and attention keep their own."""

    def __init__(self, encoders: list[nn.Module], bridge_inputs: list[BridgeInput], vocab_size: int,
                 num_classes: int, o: dict[str, Any], variant: Variant, backend: Backend) -> None:
        check_positive_int(vocab_size, "vocab_size")
        check_positive_int(num_classes, "num_classes")
        label_dim = check_positive_int(o["label_dim"], "label_dim")
        bridge_factor = check_positive_int(o["bridge_factor"], "bridge_factor")
        first_loss = check_choice(o["first_ae_loss"], "first_ae_loss", AE_LOSSES)
        side: LabelSide = o["label_side"]
        blocks = []
        y_dim = num_classes
        for i, (f, (reduce, features)) in enumerate(zip(encoders, bridge_inputs)):
            g, h = side.encoder(y_dim, label_dim), side.decoder(label_dim, y_dim, first=i == 0, first_ae_loss=first_loss)
            b = side.bridge(features, label_dim, bridge_factor, [reduce])
            for part in (g, h, b):
                initialise(part, o["init"])
            blocks.append(ALBlock(f, g, b, h))
            y_dim = label_dim
        super().__init__(blocks, num_classes, variant=variant, first_ae_loss=first_loss, backend=backend)
        self.vocab_size = vocab_size


def _embedding_bridge_input(dim: int, mask_padding: bool) -> BridgeInput:
    """The bridge input of an embedding that is a block of its own: the mean of the embeddings
    (over every position, padding too, without ``mask_padding``, as the ICLR 2022 code)."""
    return SequenceMean(skip_padding=mask_padding), dim


class LSTM_AL(_SequenceAL):
    """The ICLR 2022 LSTM text classifier as AL blocks; inputs are token ids (0 = padding).

    ``hidden`` gives one LSTM per block. ``embedding_block``: the embedding is block 1 of its
    own (else it opens the first LSTM block). ``bidirectional`` LSTMs; ``pass_state``: each
    LSTM starts from the final (h, c) of the one before (every width must then be equal);
    ``bridge_input``: "mean" of the positions, or "final_state" (the final h summed over
    directions). ``mask_padding``: padding never changes a result; False reads it as the
    ICLR 2022 code does. Arguments left at None take the preset's value.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int | None = None,
                 hidden: Sequence[int] | None = None, label_dim: int | None = None, bridge_factor: int | None = None,
                 variant: Variant = "A", backend: Backend = "auto", first_ae_loss: AELoss | None = None,
                 embedding_block: bool | None = None, bidirectional: bool | None = None, pass_state: bool | None = None,
                 bridge_input: str | None = None, mask_padding: bool | None = None,
                 label_side: LabelSide | None = None, init: Init | None = None, preset: str | None = None) -> None:
        o = presets.resolve("LSTM_AL", preset, embed_dim=embed_dim, hidden=hidden, label_dim=label_dim,
                            bridge_factor=bridge_factor, first_ae_loss=first_ae_loss, embedding_block=embedding_block,
                            bidirectional=bidirectional, pass_state=pass_state, bridge_input=bridge_input,
                            mask_padding=mask_padding, label_side=label_side, init=init)
        hidden = check_widths(o["hidden"], "hidden", "LSTM widths, one per block")
        if o["pass_state"] and len(set(hidden)) > 1:
            raise ValueError(f"pass_state hands each LSTM's final (h, c) to the next, so every width must be the "
                             f"same; got hidden={tuple(hidden)}")
        final_state = check_choice(o["bridge_input"], "bridge_input", LSTM_BRIDGE_INPUTS) == "final_state"
        directions = 2 if o["bidirectional"] else 1
        hands_on_state = o["pass_state"] or final_state
        mask_padding = o["mask_padding"]
        embed_dim = check_positive_int(o["embed_dim"], "embed_dim")
        check_positive_int(vocab_size, "vocab_size")
        encoders: list[nn.Module] = []
        bridges: list[BridgeInput] = []
        if o["embedding_block"]:
            encoders.append(TokenEmbedding(vocab_size, embed_dim, mask_padding=mask_padding))
            bridges.append(_embedding_bridge_input(embed_dim, mask_padding))
        in_dim = embed_dim
        for i, width in enumerate(hidden):
            lstm = SequenceLSTM(in_dim, width, o["bidirectional"], input_has_state=hands_on_state and i > 0,
                                use_input_state=o["pass_state"], output_state=hands_on_state, skip_padding=mask_padding)
            if i == 0 and not o["embedding_block"]:
                # made after the first LSTM, as before presets, so that a seed gives the same weights
                lstm = nn.Sequential(TokenEmbedding(vocab_size, embed_dim, mask_padding=mask_padding), lstm)
            encoders.append(lstm)
            if final_state:
                bridges.append((FinalStatePool(directions), width))
            else:
                bridges.append((SequenceMean(mask_padding, STATE_ROWS if hands_on_state else 0), directions * width))
            in_dim = directions * width
        super().__init__(encoders, bridges, vocab_size, num_classes, o, variant, backend)


class Transformer_AL(_SequenceAL):
    """The ICLR 2022 Transformer text classifier as AL blocks: ``num_blocks`` blocks of
    ``layers_per_block`` attention layers; inputs are token ids (0 = padding).

    ``embedding_block``: the embedding is block 1 of its own (else it opens the first);
    ``positions``: learned position embeddings up to ``max_len`` tokens; ``encoder_layer``:
    "torch" (nn.TransformerEncoderLayer, post-norm) or "iclr22" (the ICLR 2022 code's
    pre-norm layers with a closing LayerNorm, al_ext.sequence_layers.PreNormTransformer).
    Attention and the bridges after it skip padding; ``mask_padding=False`` makes padding an
    ordinary token for the embedding, as the ICLR 2022 code. Arguments left at None take the
    preset's value.
    """

    def __init__(self, vocab_size: int, num_classes: int, max_len: int = 256, dim: int | None = None,
                 heads: int | None = None, feedforward: int | None = None, num_blocks: int | None = None,
                 layers_per_block: int | None = None, label_dim: int | None = None, bridge_factor: int | None = None,
                 variant: Variant = "A", backend: Backend = "auto", first_ae_loss: AELoss | None = None,
                 positions: bool | None = None, encoder_layer: str | None = None, dropout: float | None = None,
                 embedding_block: bool | None = None, mask_padding: bool | None = None,
                 label_side: LabelSide | None = None, init: Init | None = None, preset: str | None = None) -> None:
        o = presets.resolve("Transformer_AL", preset, dim=dim, heads=heads, feedforward=feedforward,
                            num_blocks=num_blocks, layers_per_block=layers_per_block, positions=positions,
                            encoder_layer=encoder_layer, dropout=dropout, embedding_block=embedding_block,
                            mask_padding=mask_padding, label_dim=label_dim, bridge_factor=bridge_factor,
                            first_ae_loss=first_ae_loss, label_side=label_side, init=init)
        num_blocks = check_positive_int(o["num_blocks"], "num_blocks")
        per_block = check_positive_int(o["layers_per_block"], "layers_per_block")
        dim, heads = check_positive_int(o["dim"], "dim"), check_positive_int(o["heads"], "heads")
        feedforward, dropout = check_positive_int(o["feedforward"], "feedforward"), o["dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        check_heads(dim, heads)
        style = check_choice(o["encoder_layer"], "encoder_layer", ENCODER_LAYERS)
        embedding = TokenEmbedding(check_positive_int(vocab_size, "vocab_size"), dim,
                                   check_positive_int(max_len, "max_len") if o["positions"] else None, o["mask_padding"])
        encoders: list[nn.Module] = [embedding] if o["embedding_block"] else []
        bridges = [_embedding_bridge_input(dim, o["mask_padding"])] if o["embedding_block"] else []
        for i in range(num_blocks):
            layers: list[nn.Module] = [embedding] if i == 0 and not o["embedding_block"] else []
            if style == "torch":
                layers += [MaskedTransformerLayer(dim, heads, feedforward, dropout) for _ in range(per_block)]
            else:
                layers.append(PreNormTransformer(dim, heads, feedforward, per_block, dropout))
            encoders.append(nn.Sequential(*layers))
            bridges.append((SequenceMean(skip_padding=True), dim))
        super().__init__(encoders, bridges, vocab_size, num_classes, o, variant, backend)
