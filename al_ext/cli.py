"""The ``al-ext`` command line: train an AL model, and optionally its BP baseline, and compare."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import data, presets, text
from ._extension import build_info
from .models import ALCNN, LSTM_AL, VGG_AL, ResNet_AL, Transformer_AL
from .nn import ALMLP, AssociatedLearning, bp_baseline
from .callbacks import loggers_for
from .optim import OPTIMIZERS, SCHEDULES
from .precision import PRECISIONS
from .distributed import DistributedConfig
from .errors import DistributedError
from .train import Trainer
from .validation import check_output_path

DATASET_HELP = (
    "images: digits (scikit-learn's 8x8 digits, embedded), mnist-test (the MNIST test set in "
    "../shared/data/mnist-test, or $AL_EXT_MNIST_DIR), idx:IMAGES,LABELS (any IDX image/label pair); "
    "text, for --model lstm/transformer: generated-text (a 4-class topic task made here), "
    "ag_news:CSV (AG News train.csv or test.csv), imdb:DIR (the aclImdb folder, train split)"
)
TEXT_MODELS = ("lstm", "transformer")


# --model: the family each name builds (build_model), whose reference rates a preset gives.
FAMILIES: dict[str, type[AssociatedLearning]] = {"mlp": ALMLP, "cnn": ALCNN, "vgg": VGG_AL, "resnet20": ResNet_AL,
                                                 "resnet32": ResNet_AL, "lstm": LSTM_AL, "transformer": Transformer_AL}
MODELS = tuple(FAMILIES)
STEP_SCHEDULES = ("cosine", "onecycle")


def load_texts(spec: str) -> tuple[list[str], torch.Tensor] | None:
    """Texts and labels for a text dataset spec, None for an image one."""
    if spec == "generated-text":
        return text.generated_topics(6000, seed=0)
    if spec.startswith("ag_news:"):
        return text.load_ag_news(spec.removeprefix("ag_news:"))
    if spec.startswith("imdb:"):
        return text.load_imdb(spec.removeprefix("imdb:"), "train")
    return None


def encode_texts(texts: list[str], y: torch.Tensor, args: argparse.Namespace) -> tuple[torch.Tensor, int]:
    """Token ids with a vocabulary built from the training part of the split alone."""
    train = data.stratified_split(y, val=args.val, test=args.test, seed=args.seed).train
    vocab = text.Vocabulary([texts[i] for i in train.tolist()], max_size=args.vocab_size)
    return vocab.encode(texts, args.max_len), len(vocab)


def load_dataset(spec: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """(inputs flattened, labels, image shape (channels, height, width))."""
    if spec == "digits":
        return (*data.load_digits(), (1, 8, 8))
    if spec == "mnist-test":
        return (*data.load_mnist_test(), (1, 28, 28))
    if spec.startswith("idx:") and spec.count(",") == 1:
        images, labels = spec[4:].split(",")
        side = data.load_idx(images).shape[1:]
        return (*data.load_idx_pair(images, labels), (1, *side))
    raise ValueError(f"--dataset must be {DATASET_HELP}; got {spec!r}")


# Without --preset the command line builds every model with these widths, as it always has;
# with one, each width not given is the preset's.
WIDTHS_WITHOUT_PRESET = {"hidden": (1024, 1024), "label_dim": 1024, "bridge_factor": 5}
# Without --preset: Adam at this rate ((g, h) at twice it) and batch size; with one, the reference's.
TRAINING_WITHOUT_PRESET = {"lr": 1e-3, "ae_lr": None, "batch_size": 128}


def model_widths(args: argparse.Namespace) -> dict[str, Any]:
    """--hidden, --label-dim and --bridge-factor as given, each one not given filled in (None,
    for the preset's, where there is a preset)."""
    given = {"hidden": args.hidden, "label_dim": args.label_dim, "bridge_factor": args.bridge_factor}
    if args.preset is not None:
        return given
    return {k: WIDTHS_WITHOUT_PRESET[k] if v is None else v for k, v in given.items()}


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """--lr, --ae-lr and --batch-size as given, each one not given filled in from the preset's
    reference (its rates scaled to the batch size given, al_ext.presets.training_settings) or
    the command line's own defaults."""
    if args.preset is None:
        defaults = TRAINING_WITHOUT_PRESET
    else:
        defaults = presets.training_settings(args.preset, args.batch_size, family=FAMILIES[args.model])
        if args.lr is not None:  # the reference's ratio of the two rates at the rate given
            defaults["ae_lr"] = defaults["ae_lr"] / defaults["lr"] * args.lr
    given = {"lr": args.lr, "ae_lr": args.ae_lr, "batch_size": args.batch_size}
    return {k: defaults[k] if v is None else v for k, v in given.items()}


def build_model(args: argparse.Namespace, image_shape: tuple[int, int, int] | None, num_classes: int,
                vocab_size: int | None = None) -> AssociatedLearning:
    widths = model_widths(args)
    common = dict(num_classes=num_classes, label_dim=widths["label_dim"], bridge_factor=widths["bridge_factor"],
                  variant=args.variant, backend=args.backend, first_ae_loss=args.first_ae_loss, preset=args.preset)
    if (vocab_size is None) == (args.model in TEXT_MODELS):
        raise ValueError(f"--model {args.model} needs {'a text' if vocab_size is None else 'an image'} dataset; "
                         f"--dataset is {args.dataset!r}")
    hidden = widths["hidden"]
    if args.hidden is not None and args.model not in ("mlp", "lstm", "transformer"):
        raise ValueError(f"--hidden sets the widths of --model mlp and lstm (and the block count of transformer); "
                         f"--model {args.model} takes its preset's widths (al_ext.models in Python sets them all)")
    if args.model == "lstm":
        return LSTM_AL(vocab_size, hidden=hidden, **common)
    if args.model == "transformer":
        return Transformer_AL(vocab_size, max_len=args.max_len, num_blocks=None if hidden is None else len(hidden),
                              **common)
    if args.model == "mlp":
        return ALMLP(math.prod(image_shape), hidden=hidden, **common)
    if args.model == "cnn":
        return ALCNN(image_shape, **common)
    if args.model == "vgg":
        return VGG_AL(image_shape, **common)
    return ResNet_AL(int(args.model.removeprefix("resnet")), image_shape, **common)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return widths


def _int_from(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {text!r}")
        return value
    return parse


_positive_int = _int_from(1)


def _size(text: str) -> float | int:
    """A split size: a fraction if it has a decimal point, else a sample count."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.2 or a count such as 2000, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="al-ext", description="Associated Learning for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train an AL model (and optionally its BP baseline) and report accuracy and throughput",
        description="Train an Associated Learning model with its local losses; with --compare-bp also train "
        "the BP baseline (the same inference path trained end to end) on the same split and compare accuracy "
        "and samples/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--dataset", default="digits", help=DATASET_HELP)
    train.add_argument("--model", default="mlp", choices=MODELS,
                       help="architecture: mlp (the NECO MLP, ALMLP), cnn (the NECO CNN, ALCNN), vgg (VGG_AL), "
                       "resnet20 / resnet32 (ResNet_AL) on images; lstm (LSTM_AL) or transformer (Transformer_AL) "
                       "on text. --hidden gives the MLP's and the LSTM's widths, and the Transformer's block count")
    train.add_argument("--epochs", type=_positive_int, default=20, help="training epochs (the same for AL and BP)")
    train.add_argument("--compare-bp", action="store_true", help="also train the BP baseline: the AL model's inference path trained end to end with "
                       "cross-entropy (matched on that path; AL also trains its label side and every bridge)")
    train.add_argument("--variant", default="A", choices=["A", "B"],
                       help="A: L_as updates f and b; B: L_as also updates g (its target is not detached)")
    train.add_argument("--preset", default=None, choices=list(presets.PRESET_NAMES),
                       help="build the model as the authors' code does (al_ext.presets): neco (the NECO TensorFlow "
                       "code: mlp, cnn, vgg, resnet20/32) or iclr22 (the ICLR 2022 PyTorch code: lstm, transformer); "
                       "widths, --lr, --ae-lr and --batch-size not given are then the reference's (its rates "
                       "scaled by the square root of the batch ratio where --batch-size is given)")
    train.add_argument("--hidden", type=_widths, default=None,
                       help="x-side widths, one per block, comma-separated (default 1024,1024, or the preset's)")
    train.add_argument("--label-dim", type=_positive_int, default=None, help="label-side width d (default 1024, or the preset's)")
    train.add_argument("--bridge-factor", type=_positive_int, default=None,
                       help="bridge hidden width = factor x label-dim (default 5, or the preset's)")
    train.add_argument("--max-len", type=_positive_int, default=64, help="text: tokens kept per text (padded or cut)")
    train.add_argument("--vocab-size", type=_int_from(text.MIN_VOCABULARY), default=20000, help="text: the vocabulary's size at most")
    train.add_argument("--first-ae-loss", default=None, choices=["mse", "cross_entropy"],
                       help="loss of the first block's auto-encoder (default mse, or the preset's)")
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate of (f, b) and of the BP baseline (default 1e-3, or the preset's)")
    train.add_argument("--ae-lr", type=float, default=None,
                       help="learning rate of (g, h) (default 2 x lr, or the preset's ratio to lr)")
    train.add_argument("--batch-size", type=_positive_int, default=None, help="training batch size (default 128, or the preset's)")
    train.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS), help="optimiser of every parameter group")
    train.add_argument("--momentum", type=float, default=0.9, help="momentum of --optimizer sgd")
    train.add_argument("--weight-decay", type=float, default=None,
                       help="weight decay (adam, sgd: L2; adamw: decoupled); default torch's (0; adamw 0.01)")
    train.add_argument("--schedule", default="none", choices=["none", *SCHEDULES, *STEP_SCHEDULES],
                       help="learning-rate schedule: neco steps x0.1 at 40/60/80%% and x0.5 at 90%% of the run; "
                       "plateau cuts x0.1 when validation accuracy stalls; cosine anneals to 0 over the run, and "
                       "onecycle warms up to 10 x lr and anneals, both stepped every batch")
    train.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                       help="bf16: bfloat16 compute over float32 master weights, optimiser state and losses (the "
                       "fused step's bf16 GEMMs where the hardware has them, else autocast); fp16: autocast on CUDA "
                       "with loss scaling. AL and the BP baseline use the same")
    train.add_argument("--val", type=_size, default=0.1, help="validation part: fraction (0.1) or count (1000)")
    train.add_argument("--test", type=_size, default=0.2, help="test part: fraction (0.2) or count (2000)")
    train.add_argument("--seed", type=_int_from(0), default=0, help="seed of the split, the initial weights and the batch order")
    train.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    train.add_argument("--backend", default="auto", choices=["auto", "fused", "reference"],
                       help="auto: each block's whole step as one fused op where it fits (dense blocks on the CPU), "
                       "else autograd; fused: insist on the fused op; reference: plain PyTorch (autograd) always")
    train.add_argument("--no-label-warmup", action="store_true",
                       help="start the AL run at once, without first training the label side alone until it tells "
                       "every class apart at every depth (the Trainer's label_warmup)")
    train.add_argument("--pipeline", action="store_true",
                       help="train the AL blocks at the same time on consecutive batches (C++ scheduler: threads "
                       "on the CPU, a stream per block on CUDA); same parameters as without, bit for bit on the "
                       "CPU at equal intra-op thread counts")
    train.add_argument("--cuda-graphs", action="store_true",
                       help="with --pipeline on CUDA and fused blocks: replay each block's step from a CUDA graph")
    train.add_argument("--distributed", action="store_true",
                       help="under torchrun: train across its processes (Gloo on the CPU, NCCL on CUDA), each rank "
                       "its share; --batch-size is the global batch")
    train.add_argument("--pipeline-stages", type=_positive_int, default=1, metavar="P",
                       help="with --distributed: P ranks each train a contiguous range of blocks (at most one stage "
                       "per block), activations passed forward between them")
    train.add_argument("--data-parallel", type=_positive_int, default=None, metavar="R",
                       help="with --distributed: R replicas of the pipeline, each on its share of every batch, "
                       "gradients averaged per block; P x R must be the number of processes (default: all of them)")
    train.add_argument("--resume", type=Path, default=None, metavar="FILE",
                       help="continue the AL run from a checkpoint that --save wrote (distributed or not)")
    train.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the full results as JSON")
    train.add_argument("--save", type=Path, default=None, metavar="FILE",
                       help="save the AL trainer's final state: a checkpoint that Trainer.load resumes")
    train.add_argument("--save-best", type=Path, default=None, metavar="FILE",
                       help="save the AL model's weights of the best epoch on validation (a state_dict)")
    train.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                       help="log every step and epoch there: JSON lines and CSV, and TensorBoard where installed "
                       "(pip install al-ext[tensorboard])")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _format_epoch(name: str, record: dict[str, Any], epochs: int) -> str:
    parts = [f"{name} epoch {record['epoch']:>3}/{epochs}"]
    if "loss_as" in record:
        parts.append("L_as " + " ".join(f"{v:.4f}" for v in record["loss_as"]))
        parts.append("L_ae " + " ".join(f"{v:.4f}" for v in record["loss_ae"]))
    else:
        parts.append(f"loss {record['loss']:.4f}")
    if "val_accuracy" in record:
        parts.append(f"val {record['val_accuracy']:.4f}")
        if "val_shortcut_accuracy" in record:
            parts.append("by depth [" + " ".join(f"{v:.3f}" for v in record["val_shortcut_accuracy"]) + "]")
    parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    if "label_warmup_steps" in record:
        parts.append(f"(label warm-up: {record['label_warmup_steps']} steps first)")
    if "collapse_warning" in record:
        parts.append(f"\n  warning: {record['collapse_warning']}")
    return "  ".join(parts)


def _step_scheduler(name: str, total_steps: int) -> Any:
    """A per-batch schedule over the whole run, for every optimiser."""
    if name == "cosine":
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    # The learning rate alone: cycling momentum too would change the betas that the fused step
    # holds for a run, and send the MLP to the general path.
    return lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[10 * g["lr"] for g in opt.param_groups], total_steps=total_steps, cycle_momentum=False)


def _distributed_config(args: argparse.Namespace) -> DistributedConfig | None:
    if not args.distributed:
        if args.pipeline_stages != 1 or args.data_parallel is not None:
            raise ValueError("--pipeline-stages and --data-parallel need --distributed (and torchrun)")
        return None
    if args.compare_bp or args.pipeline:
        raise ValueError(f"--distributed trains AL across processes; it does not take "
                         f"{'--compare-bp' if args.compare_bp else '--pipeline'} (the ranks are the pipeline)")
    return DistributedConfig(pipeline_stages=args.pipeline_stages, data_parallel=args.data_parallel)


def _is_main_process() -> bool:
    """Rank 0 of a distributed job (before it joins: as its launcher numbered it), or the
    only process: the one that prints and writes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _say(*values: Any) -> None:
    if _is_main_process():
        print(*values, flush=True)


def _train_one(name: str, model: torch.nn.Module, splits: data.DatasetSplits, args: argparse.Namespace) -> tuple[Trainer, dict[str, Any]]:
    al = name == "AL"
    schedule = None if args.schedule == "none" else args.schedule
    options = training_options(args)
    steps = args.epochs * -(-splits.train[0].shape[0] // options["batch_size"])
    per_step = _step_scheduler(schedule, steps) if schedule in STEP_SCHEDULES else None
    log_dir = None if args.log_dir is None else args.log_dir / name
    trainer = Trainer(model, **options, device=args.device,
                      pipeline=args.pipeline and al, cuda_graphs=args.cuda_graphs and al, seed=args.seed,
                      schedule=None if per_step is not None else schedule, scheduler=per_step,
                      progress=False if args.no_progress else None, optimizer=args.optimizer,
                      momentum=args.momentum, weight_decay=args.weight_decay, precision=args.precision,
                      distributed=_distributed_config(args) if al else None,
                      label_warmup=False if al and args.no_label_warmup else None,
                      callbacks=[] if log_dir is None or not _is_main_process() else loggers_for(log_dir))
    if al and args.resume is not None:
        trainer.load(args.resume)
    try:
        history = trainer.fit(splits.train, splits.val, epochs=args.epochs,
                              on_epoch=lambda r: _say(_format_epoch(name, r, args.epochs)),
                              save_best=args.save_best if al else None)
    finally:
        trainer.close_callbacks()
    if al and args.save is not None:
        trainer.save(args.save)  # the final state, before the best weights are restored below
    train_time = sum(r["train_time_s"] for r in history)
    result: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples_per_s": splits.train[0].shape[0] * len(history) / train_time,
        "train_time_s": train_time,
        "history": history,
    }
    if splits.test is not None:
        final = trainer.evaluate(splits.test)
        result["test_accuracy"] = final["accuracy"]
        if "shortcut_accuracy" in final:
            result["test_shortcut_accuracy"] = final["shortcut_accuracy"]
    if trainer.best is not None:
        result["best_val"] = trainer.best
        if splits.test is not None and not trainer.best_weights_known:
            _say(f"{name}: the best epoch came before --resume and its weights were not saved (--save-best): "
                 "no test accuracy at the best validation epoch")
        elif splits.test is not None:
            trainer.restore_best()
            result["test_accuracy_at_best_val"] = trainer.evaluate(splits.test)["accuracy"]
    return trainer, result


def _print_comparison(results: dict[str, dict[str, Any]]) -> None:
    # "trained params": AL trains its label side and every bridge as well as the inference
    # path that BP trains, so the two counts differ although the inference paths match.
    print("\nresult  trained params   test acc (final)   best val (epoch)   test acc @ best val   samples/s")
    for name, r in results.items():
        test = f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else "-"
        best = f"{r['best_val']['val_accuracy']:.4f} ({r['best_val']['epoch']})" if "best_val" in r else "-"
        at_best = f"{r['test_accuracy_at_best_val']:.4f}" if "test_accuracy_at_best_val" in r else "-"
        print(f"{name:<7} {r['parameters'] / 1e6:>13.2f}M   {test:>16}   {best:>16}   {at_best:>19}   {r['samples_per_s']:>9,.0f}")
    if "AL" in results and "BP" in results and "test_accuracy" in results["AL"]:
        gap = 100 * (results["AL"]["test_accuracy"] - results["BP"]["test_accuracy"])
        ratio = results["AL"]["samples_per_s"] / results["BP"]["samples_per_s"]
        print(f"AL - BP test accuracy: {gap:+.2f} points; AL throughput {ratio:.2f}x BP's")


def _check_outputs(args: argparse.Namespace) -> None:
    """The files the run writes after it trains (Trainer.fit checks --save-best's itself):
    their folders must exist before it starts."""
    if _is_main_process():
        for flag, path in (("--save", args.save), ("--json", args.json)):
            if path is not None:
                check_output_path(path, flag)
        if args.log_dir is not None and args.log_dir.exists() and not args.log_dir.is_dir():
            raise ValueError(f"--log-dir must name a folder (made if missing), got the file {str(args.log_dir)!r}")


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    texts = load_texts(args.dataset)
    if texts is not None:
        y = texts[1]
        x, vocab_size = encode_texts(texts[0], y, args)
        image_shape = None
    else:
        x, y, image_shape = load_dataset(args.dataset)
        vocab_size = None
    splits = data.split_dataset(x, y, val=args.val, test=args.test, seed=args.seed)
    sizes = {k: 0 if v is None else v[0].shape[0] for k, v in vars(splits).items()}
    num_classes = int(y.max()) + 1
    _distributed_config(args)  # a bad combination fails before any work
    _check_outputs(args)
    _say(f"dataset {args.dataset}: {x.shape[0]} samples, {num_classes} classes; stratified split (seed {args.seed}): "
         f"{sizes['train']} train / {sizes['val']} val / {sizes['test']} test")
    absent = sorted(set(range(num_classes)) - set(y.unique().tolist()))
    if absent:  # labels counted from 1, or classes dropped: the model gets outputs nothing trains
        _say(f"  warning: no sample has label {', '.join(map(str, absent[:10]))}{' ...' if len(absent) > 10 else ''} "
             f"(the model has {num_classes} classes, one per label from 0 to the largest); labels should run from 0")
    torch.manual_seed(args.seed)
    model = build_model(args, image_shape, num_classes, vocab_size)
    baseline = bp_baseline(model) if args.compare_bp else None  # same initial weights on the shared path
    results: dict[str, dict[str, Any]] = {}
    _, results["AL"] = _train_one("AL", model, splits, args)
    if baseline is not None:
        _, results["BP"] = _train_one("BP", baseline, splits, args)
    if _is_main_process():
        _print_comparison(results)
    report = {
        "command": "al-ext " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "al_ext_build": build_info(),
        "threads": torch.get_num_threads(),
        "dataset": args.dataset,
        "split": {"seed": args.seed, **sizes},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "training": training_options(args),
        "results": results,
    }
    if args.json is not None and _is_main_process():
        args.json.write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        run_train(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, ImportError) as exc:
        print(f"al-ext: error{_rank_suffix()}: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"al-ext: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("al-ext: interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _say(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _rank_suffix() -> str:
    """" on rank N" in a distributed job, where every rank prints its own errors."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f" on rank {torch.distributed.get_rank()}"
    rank = os.environ.get("RANK")  # the launcher's, where the job's group was never made or is gone
    return f" on rank {rank}" if rank is not None and "WORLD_SIZE" in os.environ else ""


if __name__ == "__main__":
    sys.exit(main())
