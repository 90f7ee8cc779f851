"""No silent collapse: every preset, at its reference's settings, at batch 32, 64, 128 and
256: is its full path off chance after the first epochs, and where it is not, why.

    nice -n 19 python experiments/preset_batch_grid.py --families ALMLP LSTM_AL     (a chunk)
    nice -n 19 python experiments/preset_batch_grid.py --families ALCNN --epochs 3 --no-label-warmup
    nice -n 19 python experiments/preset_batch_grid.py --families ALCNN --epochs 3 --zero-centred --no-label-warmup
    nice -n 19 python experiments/preset_batch_grid.py --families VGG_AL --batches 256 --epochs 9 \
        --sigmoid-aware-init --no-label-warmup
    python experiments/preset_batch_grid.py --table                                (the table)

Presets and data: the "neco" presets (ALMLP, ALCNN, VGG_AL, ResNet_AL-20) on the MNIST test
set split 7000 train / 1000 validation / 2000 test (stratified, seed 0; the training split
cannot be had here); the "iclr22" presets (LSTM_AL, Transformer_AL) on
al_ext.text.generated_topics (6000 texts, 4200 / 600 / 1200, seed 0, 24 tokens, vocabulary
from the training texts). Widths are the references' except VGG_AL's x side, at an eighth of
its channels (16, 32 | 32, 64 | 64, M, 64 | dense 128, 128) so that it runs here; its label
side and bridges keep the reference's widths (300, 1500). Optimiser: each reference's Adam
settings (al_ext.presets.training_settings: NECO lr 1e-4 and 2e-4 at batch 32, 1e-3 and
2e-3 for ResNet_AL, ICLR 2022
1e-3 for both at batch 64), scaled by the square root of the batch ratio; no schedule; model
seed 0; the Trainer's label warm-up (al_ext.label_warmup) before the first batch, which
``--no-label-warmup`` leaves out, as the references do. ``--zero-centred`` gives the NECO
families al_ext.label_side.ZERO_CENTRED (tanh) in place of their sigmoid label side, a
remedy the collapse warning names; ``--sigmoid-aware-init`` keeps the sigmoid label side
and re-initialises it (sigmoid_aware_init). Test accuracy is
read at the epoch best on validation. Results are merged into
experiments/results/preset_batch_grid.json, so the grid can run in chunks of minutes.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import al_ext
from al_ext.collapse import CHANCE_MULTIPLE
from al_ext import presets, text
from al_ext.label_side import ZERO_CENTRED
from al_ext.models import ALCNN, LSTM_AL, VGG_AL, ResNet_AL, Transformer_AL
from seeded_mnist import mnist_split

BATCH_SIZES = (32, 64, 128, 256)
VGG_EIGHTH = {"stages": ((16, 32), (32, 64), (64, "M", 64)), "head": (128, 128)}

# family: (preset, data, model builder given (classes, vocabulary size or None[, label side]), widths as run)
ROWS: dict[str, tuple[str, str, Callable[..., torch.nn.Module], str]] = {
    "ALMLP": ("neco", "mnist", lambda c, v, side=None: al_ext.ALMLP(784, c, preset="neco", label_side=side), "NECO's"),
    "ALCNN": ("neco", "mnist", lambda c, v, side=None: ALCNN((1, 28, 28), c, preset="neco", label_side=side), "NECO's"),
    "VGG_AL": ("neco", "mnist", lambda c, v, side=None: VGG_AL((1, 28, 28), c, preset="neco", label_side=side,
                                                               **VGG_EIGHTH), "x side 1/8 of NECO's channels"),
    "ResNet_AL": ("neco", "mnist", lambda c, v, side=None: ResNet_AL(20, (1, 28, 28), c, preset="neco", label_side=side),
                  "NECO's (depth 20)"),
    "LSTM_AL": ("iclr22", "text", lambda c, v: LSTM_AL(v, c, preset="iclr22"), "ICLR 2022 code's"),
    "Transformer_AL": ("iclr22", "text", lambda c, v: Transformer_AL(v, c, preset="iclr22"), "ICLR 2022 code's"),
}


@functools.cache
def load(data: str) -> tuple[al_ext.data.DatasetSplits, int, int | None]:
    """(splits, classes, vocabulary size for text), made once per run."""
    if data == "mnist":
        return mnist_split(), 10, None
    texts, labels = text.generated_topics(6000, seed=0)
    train = al_ext.data.stratified_split(labels, val=0.1, test=0.2, seed=0).train
    vocab = text.Vocabulary([texts[i] for i in train.tolist()])
    return al_ext.data.split_dataset(vocab.encode(texts, 24), labels, val=0.1, test=0.2, seed=0), 4, len(vocab)


def centred(parts: al_ext.data.DatasetSplits) -> al_ext.data.DatasetSplits:
    """The inputs less the training split's per-pixel mean, as the NECO code prepares MNIST."""
    mean = parts.train[0].mean(0, keepdim=True)
    return al_ext.data.DatasetSplits(*(None if part is None else (part[0] - mean, part[1])
                                       for part in (parts.train, parts.val, parts.test)))


# Each variant of a run: its option, the suffix of its results key, and its words in the table.
VARIANTS: tuple[tuple[str, str, str], ...] = (("zero_centred", "+tanh", ", tanh label side"),
                                              ("centred_inputs", "+centred", ", centred inputs"),
                                              ("sigmoid_aware_init", "+sigmoid-init", ", sigmoid-aware init"),
                                              ("no_label_warmup", "+no-warmup", ", no label warm-up"))


def sigmoid_aware_init(model: al_ext.AssociatedLearning) -> None:
    """Every label-side Linear layer that takes sigmoid outputs and feeds a sigmoid (g_i for
    i >= 2, every h_i, the bridges' second layer) gets weights N(0, 16 / fan_in) and biases
    that cancel the inputs' common 1/2: a sigmoid's slope at 0 is 1/4, so the classes'
    differences then pass each layer at their size, where He-normal weights and zero biases
    shrink them about 3x per layer. The architecture and parameter count stay NECO's."""
    for i, block in enumerate(model.blocks):
        for part, takes_sigmoid in ((block.g, i > 0), (block.h, True), (block.b, False)):
            layers = list(part)
            for k, layer in enumerate(layers):
                fed = isinstance(layers[k - 1], torch.nn.Sigmoid) if k > 0 else takes_sigmoid
                feeds = k + 1 < len(layers) and isinstance(layers[k + 1], torch.nn.Sigmoid)
                if isinstance(layer, torch.nn.Linear) and fed and feeds:
                    with torch.no_grad():
                        layer.weight.normal_(0.0, 4.0 / layer.in_features ** 0.5)
                        layer.bias.copy_(-0.5 * layer.weight.sum(1))


def run(family: str, batch_size: int, epochs: int, zero_centred: bool = False,
        centred_inputs: bool = False, sigmoid_aware: bool = False, label_warmup: bool = True) -> dict[str, Any]:
    preset, data, make, widths = ROWS[family]
    parts, classes, vocab_size = load(data)
    if centred_inputs:
        parts = centred(parts)
    torch.manual_seed(0)
    model = make(classes, vocab_size, ZERO_CENTRED) if zero_centred else make(classes, vocab_size)
    if sigmoid_aware:
        sigmoid_aware_init(model)
    settings = presets.training_settings(preset, batch_size, family=type(model))
    trainer = al_ext.Trainer(model, progress=False, label_warmup=label_warmup, **settings)
    start = time.perf_counter()
    history = trainer.fit(parts.train, parts.val, epochs=epochs)
    seconds = time.perf_counter() - start  # the warm-up included
    trainer.restore_best()
    return {"preset": preset, "label_side": "zero-centred (tanh)" if zero_centred else "the preset's", "data": data,
            "centred_inputs": centred_inputs, "sigmoid_aware_init": sigmoid_aware,
            **(trainer.label_warmup_result or {"label_warmup_steps": None}),
            "widths": widths, **settings, "classes": classes, "epochs": epochs,
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": seconds,
            "val_accuracy": [r["val_accuracy"] for r in history],
            "val_shortcut_accuracy": [r["val_shortcut_accuracy"] for r in history],
            "collapse_warnings": [r["epoch"] for r in history if "collapse_warning" in r],
            "best_epoch": trainer.best["epoch"], "test_accuracy_at_best_val": trainer.evaluate(parts.test)["accuracy"]}


def alpackage_case(epochs: int) -> dict[str, Any]:
    """The case issue 14 reported: a 3-block LSTM_AL at the ALPackage's settings (nlpconfig.json:
    batch 256, lr 2.5e-4 for both optimisers, LSTM width 256, label width 128, embedding 300)
    on the generated topic task, with al_ext's default architecture and with the iclr22 preset,
    both started at once as the ALPackage starts; and al_ext's default after the label warm-up."""
    parts, classes, vocab_size = load("text")
    out = {}
    for name, preset, warmup in (("al_ext default", None, False), ("iclr22 preset", "iclr22", False),
                                 ("al_ext default, label warm-up", None, True)):
        torch.manual_seed(0)
        model = LSTM_AL(vocab_size, classes, embed_dim=300, hidden=(256, 256, 256), label_dim=128, preset=preset)
        trainer = al_ext.Trainer(model, lr=2.5e-4, ae_lr=2.5e-4, batch_size=256, progress=False, label_warmup=warmup)
        start = time.perf_counter()
        history = trainer.fit(parts.train, parts.val, epochs=epochs)
        out[name] = {"seconds": time.perf_counter() - start, "val_accuracy": [r["val_accuracy"] for r in history],
                     **(trainer.label_warmup_result or {}),
                     "val_shortcut_accuracy": [r["val_shortcut_accuracy"] for r in history]}
        print(f"ALPackage settings, {name}: val {[round(a, 3) for a in out[name]['val_accuracy']]}, by depth "
              f"{[round(a, 3) for a in history[-1]['val_shortcut_accuracy']]}", flush=True)
    return out


def first_epoch_above_chance(result: dict[str, Any], multiple: float = CHANCE_MULTIPLE) -> int | None:
    """The first epoch whose full-path validation accuracy is above ``multiple`` x chance."""
    chance = 1 / result["classes"]
    return next((e for e, a in enumerate(result["val_accuracy"], start=1) if a > multiple * chance), None)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print("| family (preset, widths) | batch | lr / ae_lr | full path, val acc % by epoch | first epoch > 1.5 x chance "
          "| depth-1 shortcut, last epoch | test acc at best val (epoch) | seconds |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    rows = [k for k in results if "@" in k]
    for key in sorted(rows, key=lambda k: (list(ROWS).index(k.split("@")[0]), k.count("+"), "+tanh" in k,
                                           int(k.split("@")[1].split("+")[0]))):
        r, family = results[key], key.split("@")[0]
        accs = " ".join(f"{100 * a:.0f}" for a in r["val_accuracy"])
        first = first_epoch_above_chance(r)
        side = "".join(words for _, suffix, words in VARIANTS if suffix in key)
        if r.get("label_warmup_steps") is not None:
            side += f", label warm-up of {r['label_warmup_steps']} steps"
        print(f"| {family} ({r['preset']}{side}, {r['widths']}) | {r['batch_size']} | {r['lr']:.2g} / {r['ae_lr']:.2g} "
              f"| {accs} | {first if first is not None else 'never'} | {100 * r['val_shortcut_accuracy'][-1][0]:.0f} % "
              f"| {100 * r['test_accuracy_at_best_val']:.1f} % "
              f"({r['best_epoch']}) | {r['seconds']:.0f} |")


def print_alpackage_case(case: dict[str, Any]) -> None:
    print("\n| 3-block LSTM_AL at the ALPackage's settings (batch 256, lr 2.5e-4) | full path, val acc % by epoch "
          "| by depth, last epoch |")
    print("| --- | --- | --- |")
    for name, r in case.items():
        accs = " ".join(f"{100 * a:.0f}" for a in r["val_accuracy"])
        depths = " / ".join(f"{100 * a:.0f}" for a in r["val_shortcut_accuracy"][-1])
        print(f"| {name} | {accs} | {depths} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCH_SIZES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preset_batch_grid.json")
    parser.add_argument("--table", action="store_true", help="print the table of the results so far and stop")
    parser.add_argument("--zero-centred", action="store_true",
                        help="the NECO families with al_ext.label_side.ZERO_CENTRED (tanh) in place of their sigmoid "
                        "label side, a remedy the collapse warning names")
    parser.add_argument("--centred-inputs", action="store_true",
                        help="subtract the training split's per-pixel mean from the images, as the NECO code does")
    parser.add_argument("--sigmoid-aware-init", action="store_true",
                        help="keep the NECO families' sigmoid label side, initialised by sigmoid_aware_init")
    parser.add_argument("--no-label-warmup", action="store_true",
                        help="start training at once, as the references do, without the Trainer's label warm-up")
    parser.add_argument("--alpackage", action="store_true",
                        help="run only the case issue 14 reported (alpackage_case), for 8 epochs")
    args = parser.parse_args()
    if args.sigmoid_aware_init and (args.zero_centred or any(ROWS[f][0] != "neco" for f in args.families)):
        parser.error("--sigmoid-aware-init re-initialises the NECO families' sigmoid label side: it takes neither "
                     "--zero-centred nor the iclr22 families (tanh label sides)")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.alpackage:
        results["alpackage_case"] = alpackage_case(8)
        args.out.write_text(json.dumps(results, indent=2))
        return
    if not args.table:
        for family in args.families:
            for batch_size in args.batches:
                key = f"{family}@{batch_size}" + "".join(suffix for option, suffix, _ in VARIANTS
                                                         if getattr(args, option))
                results[key] = r = run(family, batch_size, args.epochs, args.zero_centred, args.centred_inputs,
                                       args.sigmoid_aware_init, not args.no_label_warmup)
                print(f"{family} batch {batch_size}: val {[round(a, 3) for a in r['val_accuracy']]} "
                      f"({r['seconds']:.0f} s)", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    if "alpackage_case" in results:
        print_alpackage_case(results["alpackage_case"])


if __name__ == "__main__":
    main()
