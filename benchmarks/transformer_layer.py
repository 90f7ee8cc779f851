"""Transformer_AL's attention layer (al_ext.sequence_layers.MaskedTransformerLayer) against
torch's nn.TransformerEncoderLayer on the same weights: one training step's forward and
backward over a padded batch, taking turns (benchmarks/interleave.py's rule), and eval-mode
inference without autograd (where the layer calls torch's). ``--bf16``: both under
torch.autocast("cpu", torch.bfloat16), where al_ext's layer runs the attention itself in
float32 (al_ext.sequence_layers.attend). ``--model``: a Trainer's whole step of
Transformer_AL at the general-path benchmark's size (two blocks of dim 128 on --length
tokens), with al_ext's layers against the same model with torch's layer in each block.

    python benchmarks/transformer_layer.py [--batch 64] [--length 64] [--dim 128] [--threads 1 2] [--bf16] [--model]
"""
from __future__ import annotations

import argparse
import contextlib
import time
import types

import torch

import al_ext
from al_ext.sequence_layers import MaskedTransformerLayer, split
from interleave import median_ratio, median_time

ROUNDS, CALLS = 15, 4


def time_per_call(fn, state: torch.Tensor, grad: torch.Tensor | None, bf16: bool) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = fn(state)
        if grad is not None:
            out.float().backward(grad)
    return (time.perf_counter() - start) / CALLS


def with_torchs_layer(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each MaskedTransformerLayer computing through torch's own layer."""
    for layer in model.modules():
        if isinstance(layer, MaskedTransformerLayer):
            layer._post_norm = types.MethodType(lambda self, x, padding: self.layer(x, src_key_padding_mask=padding),
                                                layer)
    return model


def compare_models(args: argparse.Namespace) -> None:
    def trainer(torchs: bool) -> al_ext.Trainer:
        torch.manual_seed(0)
        model = al_ext.models.Transformer_AL(5000, 4, max_len=args.length, dim=args.dim, heads=args.heads,
                                             feedforward=args.feedforward, label_dim=128)
        return al_ext.Trainer(with_torchs_layer(model) if torchs else model, batch_size=args.batch, progress=False,
                              label_warmup=False, precision="bf16" if args.bf16 else "fp32")

    trainers = {"torch's layer": trainer(True), "al_ext's": trainer(False)}
    x, y = torch.randint(0, 5000, (args.batch, args.length)), torch.randint(0, 4, (args.batch,))
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for t in trainers.values():
            t.step(x, y)
        for _ in range(ROUNDS):
            for name, t in trainers.items():
                start = time.perf_counter()
                for _ in range(CALLS):
                    t.step(x, y)
                times[name].append((time.perf_counter() - start) / CALLS)
        for name in trainers:
            print(f"{threads} thread(s), Transformer_AL step: {name:14} {median_time(times[name]) * 1e3:6.2f} ms "
                  f"(best {min(times[name]) * 1e3:.2f}), x torch's {median_ratio(times[next(iter(trainers))], times[name]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--feedforward", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bf16", action="store_true", help="under torch.autocast in bfloat16")
    parser.add_argument("--model", action="store_true", help="a Trainer's step of Transformer_AL")
    args = parser.parse_args()
    if args.model:
        compare_models(args)
        return
    torch.manual_seed(0)
    ours = MaskedTransformerLayer(args.dim, args.heads, args.feedforward)
    lengths = torch.randint(args.length // 4, args.length + 1, (args.batch, 1))
    mask = (torch.arange(args.length) < lengths).float().unsqueeze(-1)
    state = torch.cat([torch.randn(args.batch, args.length, args.dim), mask], dim=-1).requires_grad_()
    grad = torch.randn_like(state)

    def torchs(state: torch.Tensor) -> torch.Tensor:
        features, mask = split(state)
        padding = mask[..., 0] == 0
        padding[:, 0] = False
        return torch.cat([ours.layer(features, src_key_padding_mask=padding) * mask, mask], dim=-1)

    fns = {"torch's layer": torchs, "al_ext's": ours}
    for threads in args.threads:
        torch.set_num_threads(threads)
        ours.train()
        for fn in fns.values():
            time_per_call(fn, state, grad, args.bf16)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(ROUNDS):
            for name, fn in fns.items():
                times[name].append(time_per_call(fn, state, grad, args.bf16))
        for name in fns:
            print(f"{threads} thread(s), training step: {name:14} {median_time(times[name]) * 1e3:6.2f} ms "
                  f"(best {min(times[name]) * 1e3:.2f}), x torch's {median_ratio(times[next(iter(fns))], times[name]):.3f}")
        ours.eval()
        with torch.no_grad():
            for name, fn in fns.items():
                eval_times = [time_per_call(fn, state, None, args.bf16) for _ in range(ROUNDS)]
                print(f"{threads} thread(s), eval inference: {name:14} {median_time(eval_times) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
