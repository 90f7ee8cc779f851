"""Model API: ALBlock, AssociatedLearning, the NECO MLP and the BP baseline on the same inference path."""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from . import fused, presets, reference
from ._extension import has_cuda_kernels
from .initialisation import Init, he_normal_, initialise  # noqa: F401  (he_normal_: al_ext.nn's own name)
from .label_side import LabelSide
from .reference import AE_LOSSES, VARIANTS, AELoss, BlockLosses, Variant
from .validation import (check_choice, check_float_tensor, check_labels, check_positive_int, check_tensor, check_widths,
                         first_parameter)

Backend = Literal["auto", "fused", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "fused", "reference")


def check_batch(x: Tensor, param: Tensor, in_features: int | None, name: str = "x",
                vocab_size: int | None = None, in_shape: tuple[int, ...] | None = None) -> Tensor:
    """x must be a non-empty batch on the device of ``param`` (a model parameter): token ids
    in [0, vocab_size), shape (N, T), where the model reads text; otherwise floats in the
    parameter's dtype, with ``in_features`` values per sample where the architecture fixes
    that: in any shape, or, for a model of images of ``in_shape`` (C, H, W), flat or
    (N, C, H, W) only ((N, H, W) too where C is 1), so that images in another layout, such
    as (N, H, W, C), are refused rather than read as noise."""
    if vocab_size is not None:
        return check_token_batch(x, param.device, vocab_size, name)
    check_float_tensor(x, name)
    if x.device != param.device:
        raise ValueError(f"{name} must be on {param.device} (the model's device), got {x.device}")
    if x.dtype != param.dtype:
        raise TypeError(f"{name} must have the model's dtype {param.dtype}, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (samples along dim 0), got shape {tuple(x.shape)}")
    if in_features is None:
        return x
    sample = tuple(x.shape[1:])
    if in_shape is not None:
        images = [in_shape] + ([in_shape[1:]] if in_shape[0] == 1 else [])
        if sample != (in_features,) and sample not in images:
            shapes = " or ".join(str((0, *image)).replace("0", "N", 1) for image in images)
            raise ValueError(f"{name} must be images {shapes}, or flat (N, {in_features}), got shape {tuple(x.shape)} "
                             "(images in another layout, such as (N, H, W, C), need a permute first)")
    elif math.prod(sample) != in_features:
        raise ValueError(f"{name} must have {in_features} features per sample, got shape {tuple(x.shape)}")
    return x


def check_token_batch(x: Tensor, device: torch.device, vocab_size: int, name: str = "x") -> Tensor:
    check_tensor(x, name)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (batch, length) tensor of token ids, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} (the model's device), got {x.device}")
    low, high = int(x.min()), int(x.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} token ids must lie in [0, {vocab_size}), got values from {low} to {high}")
    return x if x.dtype in (torch.int64, torch.int32) else x.long()  # the index dtypes nn.Embedding takes


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd, for inference on a model that may be training: no BatchNorm
    statistic moves and no dropout draws. Every submodule goes back to the mode it was in."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


class ALBlock(nn.Module):
    """One Associated Learning block: x-side encoder f, label-side encoder g and decoder h,
    and the bridge b from x-side to label-side. Any four modules will do (MLP, conv, recurrent...)."""

    def __init__(self, f: nn.Module, g: nn.Module, b: nn.Module, h: nn.Module) -> None:
        super().__init__()
        for name, part in (("f", f), ("g", g), ("b", b), ("h", h)):
            if not isinstance(part, nn.Module):
                raise TypeError(f"ALBlock: {name} must be an nn.Module, got {type(part).__name__}")
        self.f, self.g, self.b, self.h = f, g, b, h

    def forward(self, s_prev: Tensor, t_prev: Tensor) -> tuple[Tensor, Tensor]:
        """The two encoders: (s_i, t_i) = (f(s_{i-1}), g(t_{i-1}))."""
        return self.f(s_prev), self.g(t_prev)


def _check_parameter_groups(blocks: list[ALBlock]) -> None:
    """Each block's (f, b) and (g, h) train with an optimiser of their own: each needs some
    parameters, and a parameter in two of these groups would be stepped twice per batch (and
    by two threads at once when pipelined)."""
    owners: dict[int, str] = {}
    for i, block in enumerate(blocks):
        for group, shares in zip(("f and b", "g and h"), reference.parameter_groups(block)):
            name = f"blocks[{i}]'s {group}"
            params = {id(p): p for p in shares}
            if not params:
                raise ValueError(f"{name} have no parameters: each block trains (f, b) and (g, h) with an optimiser "
                                 "of their own, so each needs some")
            for p in (p for p in params.values() if p.requires_grad):  # frozen ones no optimiser steps
                other = owners.setdefault(id(p), name)
                if other != name:
                    raise ValueError(f"{name} share a parameter (of shape {tuple(p.shape)}) with {other}: each block's "
                                     "(f, b) and (g, h) train with an optimiser of their own, so a shared parameter "
                                     "would be stepped twice per batch; give each its own module")


class AssociatedLearning(nn.Module):
    """A network of ALBlocks trained by local losses only.

    ``backend``: "auto" trains each block with the fused op where it fits (dense blocks on
    the CPU) and through autograd otherwise; "fused" insists on the fused op;
    "reference" is plain PyTorch (al_ext.reference).

    ``model(x)`` returns class scores through the full inference path
    h_1(h_2(... h_L(b_L(f_L(... f_1(x)))))); ``predict`` and ``predict_adaptive`` give
    classes through the full, shortcut and adaptive paths. ``local_losses(x, y)`` is the
    training forward pass: each block's (L_as, L_ae), with nothing crossing a block.
    """

    def __init__(
        self,
        blocks: Sequence[ALBlock],
        num_classes: int,
        variant: Variant = "A",
        first_ae_loss: AELoss = "mse",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if isinstance(blocks, ALBlock) or not isinstance(blocks, Iterable):
            raise TypeError(f"blocks must be a list of ALBlocks, got {type(blocks).__name__}")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must hold at least one ALBlock, got none")
        for i, block in enumerate(blocks):
            if not isinstance(block, ALBlock):
                raise TypeError(f"blocks[{i}] must be an ALBlock, got {type(block).__name__}")
        if check_positive_int(num_classes, "num_classes") < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        _check_parameter_groups(blocks)
        self.blocks = nn.ModuleList(blocks)
        self.num_classes = num_classes
        self.variant: Variant = check_choice(variant, "variant", VARIANTS)  # type: ignore[assignment]
        self.first_ae_loss: AELoss = check_choice(first_ae_loss, "first_ae_loss", AE_LOSSES)  # type: ignore[assignment]
        self.backend: Backend = check_choice(backend, "backend", BACKENDS)  # type: ignore[assignment]
        # Number of input features per sample, where the architecture fixes it (checked on every call);
        # for models that read text, the vocabulary size (inputs are token ids).
        self.in_features: int | None = None
        self.vocab_size: int | None = None
        self.in_shape: tuple[int, ...] | None = None  # (C, H, W), for a model of images

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def _reference_tensor(self) -> Tensor:
        return first_parameter(self)

    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        """The checked batch (see check_batch); (N, features) where the first encoder opens with
        nn.Flatten, as that layer makes it: the fused step, which takes the block's Linear
        alone, reads it so too."""
        s = check_batch(x, self._reference_tensor(), self.in_features, name, self.vocab_size, self.in_shape)
        first = self.blocks[0].f
        if isinstance(first, nn.Sequential) and len(first) and fused.is_plain(first[0], nn.Flatten):
            s = s.flatten(1)  # and f's Flatten leaves it as it is
        return s

    def label_targets(self, y: Tensor, samples: int | None = None) -> Tensor:
        """t_0 = one-hot(y), in the model's dtype and on its device, of ``samples`` labels
        where given. Their range is checked where they are on the CPU (on a GPU that would
        wait for it; the Trainer checks them before they get there)."""
        y = check_labels(y, self.num_classes, "y", samples, read_values=check_tensor(y, "y").device.type == "cpu")
        param = self._reference_tensor()
        return reference.one_hot_targets(y.to(param.device), self.num_classes, param.dtype)

    def inputs_and_targets(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(s_0, t_0) of a training batch: the checked inputs (see check_batch) and the
        one-hot targets of the checked labels."""
        s = self.check_input(x)
        return s, self.label_targets(y, s.shape[0])

    def fused_block_problem(self) -> str | None:
        """Why the fused dense block step cannot train this model as it stands, or None if it can."""
        param = self._reference_tensor()
        if param.device.type == "cuda":
            if not has_cuda_kernels():
                return "this build of al_ext has no CUDA kernels"
            dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        elif param.device.type == "cpu":
            dtypes = (torch.float32, torch.float64)
        else:
            return f"the fused dense block step has no kernel for {param.device.type}"
        if param.dtype not in dtypes:
            return f"the fused dense block step on {param.device.type} takes {', '.join(map(str, dtypes))}, not {param.dtype}"
        for i, block in enumerate(self.blocks):
            try:
                params, _, h_activation = fused.dense_block_layout(block)
            except ValueError as exc:
                return f"block {i + 1} does not fit the fused dense block: {exc}"
            if len({p.untyped_storage().data_ptr() for p in params}) < len(params):
                return f"block {i + 1} ties some of its weights (the fused step updates each in place, alone)"
            if self.ae_loss_of(i) == "cross_entropy" and h_activation != "identity":
                return (f"block {i + 1}'s h ends in {h_activation}, and the fused step takes the cross-entropy "
                        "auto-encoder loss on h's logits only")
        return None

    def uses_fused_step(self) -> bool:
        """Whether training runs each block as one fused op: backend "fused", or "auto" where
        it fits on the CPU (the CUDA kernel is chosen by "auto" once it has run on a GPU)."""
        if self.backend == "reference":
            return False
        problem = self.fused_block_problem()
        if self.backend == "fused":
            if problem is not None:
                raise ValueError(f"backend='fused' cannot train this model: {problem}")
            return True
        return problem is None and self._reference_tensor().device.type == "cpu"

    def local_losses(self, x: Tensor, y: Tensor) -> list[BlockLosses]:
        """Training forward pass: each block's outputs and (L_as, L_ae); no gradient crosses a block.

        The losses use ATen's mse_loss on every backend: through autograd it is 2-2.5x faster
        than al_ext.ops.mse_loss on this project's CPU (43 against 94 us forward and backward
        at 64 x 128, 2.5 against 6.3 ms at 512 x 5120), which pays only inside a fused step."""
        s, t = self.inputs_and_targets(x, y)
        out = []
        for i, block in enumerate(self.blocks):
            try:
                losses = reference.local_losses(block, s, t, self.variant, self.ae_loss_of(i))
            except (ValueError, TypeError) as exc:  # what a block's own parts got wrong: say which block
                raise (ValueError if isinstance(exc, ValueError) else TypeError)(f"block {i + 1}: {exc}") from exc
            except RuntimeError as exc:  # torch's own (a width mismatch, say), whose type and text stay
                if hasattr(exc, "add_note"):  # Python 3.11 on
                    exc.add_note(f"(raised in block {i + 1} of the model)")
                raise
            out.append(losses)
            s, t = losses.s, losses.t
        return out

    def ae_loss_of(self, index: int) -> AELoss:
        """The auto-encoder loss of block ``index`` (from 0): ``first_ae_loss`` for the first
        block, whose h decodes the labels themselves; MSE for every later one."""
        return self.first_ae_loss if index == 0 else "mse"

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], list[nn.Parameter]]]:
        """Per block: (parameters of f and b, parameters of g and h), the two optimisers' shares."""
        return [reference.parameter_groups(block) for block in self.blocks]

    def decode(self, t_hat: Tensor, depth: int) -> Tensor:
        """Class scores from a code of block ``depth``'s label side: h_1(...h_depth(t_hat))."""
        for block in reversed(self.blocks[:depth]):
            t_hat = block.h(t_hat)
        return t_hat

    def _check_depth(self, depth: int) -> int:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= self.depth:
            raise ValueError(f"depth must be an integer in [1, {self.depth}], got {depth!r}")
        return depth

    def scores(self, x: Tensor, depth: int | None = None) -> Tensor:
        """Class scores through the shortcut path of the given depth (the full path by default)."""
        depth = self.depth if depth is None else self._check_depth(depth)
        s = self.check_input(x)
        for block in self.blocks[:depth]:
            s = block.f(s)
        return self.decode(self.blocks[depth - 1].b(s), depth)

    def forward(self, x: Tensor) -> Tensor:
        return self.scores(x)

    def shortcut_scores(self, x: Tensor) -> list[Tensor]:
        """Class scores of every shortcut depth 1..L, sharing the x-side encoders."""
        s = self.check_input(x)
        out = []
        for k, block in enumerate(self.blocks, start=1):
            s = block.f(s)
            out.append(self.decode(block.b(s), k))
        return out

    def confidence(self, scores: Tensor) -> Tensor:
        """A sample's confidence in [0, 1]: the largest softmax probability where the first
        decoder emits logits (cross-entropy), else the largest score (sigmoid outputs)."""
        probs = scores.softmax(dim=1) if self.first_ae_loss == "cross_entropy" else scores
        return probs.max(dim=1).values

    def predict(self, x: Tensor, depth: int | None = None) -> Tensor:
        """Predicted classes through the full path, or the shortcut path of depth ``depth``
        (in eval mode, whatever mode the model is in)."""
        with evaluating(self):
            return self.scores(x, depth).argmax(dim=1)

    def predict_adaptive(self, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """Early exit: each sample leaves at the first depth whose confidence reaches ``threshold``
        (the last block otherwise). Deeper blocks only see the samples still in flight. In
        eval mode, whatever mode the model is in.

        Returns (classes, depths), depths counted from 1.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a confidence in (0, 1], got {threshold!r}")
        with evaluating(self):
            return self._exit_early(x, threshold)

    def _exit_early(self, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        s = self.check_input(x)
        n = s.shape[0]
        classes = torch.empty(n, dtype=torch.long, device=s.device)
        depths = torch.full((n,), self.depth, dtype=torch.long, device=s.device)
        active = torch.arange(n, device=s.device)
        for k, block in enumerate(self.blocks, start=1):
            s = block.f(s)
            scores = self.decode(block.b(s), k)
            leave = self.confidence(scores) >= threshold if k < self.depth else torch.ones_like(active, dtype=torch.bool)
            classes[active[leave]] = scores[leave].argmax(dim=1)
            depths[active[leave]] = k
            active, s = active[~leave], s[~leave]
            if active.numel() == 0:
                break
        return classes, depths


class ALMLP(AssociatedLearning):
    """The NECO MLP: per block f = Linear + ELU (or ``activation``), and the label side and
    bridges that ``label_side`` describes; by default (and with ``preset="neco"``) NECO's:
    g = Linear + sigmoid, h = Linear + sigmoid, b = Linear(d_x -> bridge_factor * label_dim)
    + sigmoid + Linear(-> label_dim) + sigmoid, He-normal weights (al_ext.presets.neco_mlp).

    Inputs of any shape whose per-sample size is ``in_features`` are flattened. With
    ``first_ae_loss="cross_entropy"`` the first decoder emits logits (no sigmoid). Arguments
    left at None take the preset's value. With the NECO label side, each block trains as one
    fused op on the CPU.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] | None = None,
        label_dim: int | None = None,
        bridge_factor: int | None = None,
        variant: Variant = "A",
        backend: Backend = "auto",
        first_ae_loss: AELoss | None = None,
        activation: str | None = None,
        label_side: LabelSide | None = None,
        init: Init | None = None,
        preset: str | None = None,
    ) -> None:
        o = presets.resolve("ALMLP", preset, hidden=hidden, label_dim=label_dim, bridge_factor=bridge_factor,
                            first_ae_loss=first_ae_loss, activation=activation, label_side=label_side, init=init)
        check_positive_int(in_features, "in_features")
        act = reference.activation_module(o["activation"])
        check_positive_int(num_classes, "num_classes")
        label_dim = check_positive_int(o["label_dim"], "label_dim")
        bridge_factor = check_positive_int(o["bridge_factor"], "bridge_factor")
        side: LabelSide = o["label_side"]
        first_loss = check_choice(o["first_ae_loss"], "first_ae_loss", AE_LOSSES)
        hidden = check_widths(o["hidden"], "hidden", "widths, one per block")
        blocks = []
        x_dim, y_dim = in_features, num_classes
        for i, width in enumerate(hidden):
            flatten = [nn.Flatten()] if i == 0 else []
            f = nn.Sequential(*flatten, nn.Linear(x_dim, width), act())
            blocks.append(ALBlock(f, side.encoder(y_dim, label_dim), side.bridge(width, label_dim, bridge_factor),
                                  side.decoder(label_dim, y_dim, first=i == 0, first_ae_loss=first_loss)))
            x_dim, y_dim = width, label_dim
        super().__init__(blocks, num_classes, variant=variant, first_ae_loss=first_loss, backend=backend)
        self.in_features = in_features
        initialise(self, o["init"])


class BPNetwork(nn.Module):
    """An AL model's inference path f_1..f_L, b_L, h_L..h_1 as one network, trained end to end."""

    def __init__(self, encoders: Sequence[nn.Module], bridge: nn.Module, decoders: Sequence[nn.Module],
                 num_classes: int, in_features: int | None, vocab_size: int | None = None,
                 in_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.bridge = bridge
        self.decoders = nn.ModuleList(decoders)  # h_L first, h_1 last
        self.num_classes = num_classes
        self.in_features, self.vocab_size, self.in_shape = in_features, vocab_size, in_shape

    def forward(self, x: Tensor) -> Tensor:
        s = check_batch(x, first_parameter(self), self.in_features, vocab_size=self.vocab_size, in_shape=self.in_shape)
        for f in self.encoders:
            s = f(s)
        t = self.bridge(s)
        for h in self.decoders:
            t = h(t)
        return t

    def predict(self, x: Tensor) -> Tensor:
        """Predicted classes (in eval mode, whatever mode the network is in)."""
        with evaluating(self):
            return self(x).argmax(dim=1)


def bp_baseline(model: AssociatedLearning) -> BPNetwork:
    """The BP baseline: the AL model's inference path (f_1..f_L, b_L, h_L..h_1) as one network,
    to be trained end to end with softmax cross-entropy. It is matched to AL on the inference
    path only: AL also trains the label encoders g and every bridge but the last, so it
    trains more parameters (the NECO MLP: 24.96 M against 13.41 M). Its modules are copies of the model's, so a baseline taken from an
    untrained model starts from the same weights. A trailing Sigmoid on h_1 is dropped, so that
    cross-entropy sees logits (softmax over sigmoid outputs saturates); argmax is unchanged.
    """
    if not isinstance(model, AssociatedLearning):
        raise TypeError(f"model must be an AssociatedLearning, got {type(model).__name__}")
    blocks = copy.deepcopy(model.blocks)
    decoders = [block.h for block in reversed(blocks)]
    first = decoders[-1]
    if isinstance(first, nn.Sequential) and len(first) > 1 and isinstance(first[-1], nn.Sigmoid):
        decoders[-1] = first[:-1]
    return BPNetwork([block.f for block in blocks], blocks[-1].b, decoders, model.num_classes, model.in_features,
                     model.vocab_size, model.in_shape)
