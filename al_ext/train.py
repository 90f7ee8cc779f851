"""Trainer: one loop for Associated Learning (local losses, per-loss Adam) and for ordinary
networks trained end to end with cross-entropy, so that AL and its BP baseline are measured alike."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .fused import FusedBlockAdam, FusedBlockSGD
from .nn import AssociatedLearning, check_token_batch
from .pipeline import Pipeline, PipelineError
from .validation import (
    check_choice,
    check_finite,
    check_float_tensor,
    check_labels,
    check_positive_float,
    check_positive_int,
    check_tensor,
)

Data = Union[tuple[Tensor, Tensor], DataLoader]
Schedule = Literal["neco", "plateau"]
SCHEDULES: tuple[str, ...] = ("neco", "plateau")
OptimizerName = Literal["adam", "sgd"]
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
CHECKPOINT_FORMAT = "al_ext.checkpoint/1"


def neco_lr_factor(epoch: int, total_epochs: int) -> float:
    """The NECO step schedule: x0.1 at 40, 60 and 80 % of the run, then x0.5 at 90 %."""
    progress = epoch / total_epochs
    factor = 1.0
    for milestone, step in ((0.4, 0.1), (0.6, 0.1), (0.8, 0.1), (0.9, 0.5)):
        if progress >= milestone:
            factor *= step
    return factor


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device")
    return dev


class Trainer:
    """Trains an ``AssociatedLearning`` model with its local losses, or any classifier
    ``nn.Module`` end to end with cross-entropy.

    AL: per block one optimiser over (f, b) with ``lr`` and one over (g, h) with ``ae_lr``
    (2 x lr by default), both stepped from the same forward pass; for dense blocks on the
    CPU the model's backend may fuse a block's whole step into one op. BP: one optimiser
    over all parameters with ``lr``. ``optimizer`` is "adam" or "sgd" (with ``momentum``).
    ``pipeline=True`` (AL only) trains all blocks at the same time on consecutive batches
    (al_ext.Pipeline, with ``max_in_flight``, ``threads_per_stage``, ``pipeline_stages`` and,
    on CUDA, ``cuda_graphs``);
    the parameters are those of the sequential loop. ``schedule`` is None, ``"neco"`` (step
    decay at 40/60/80/90 % of the run) or ``"plateau"`` (x0.1 when validation accuracy
    stalls for 5 epochs). ``seed`` fixes the order of the batches.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        ae_lr: float | None = None,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
        seed: int = 0,
        schedule: Schedule | None = None,
        progress: bool | None = None,
        eval_batch_size: int = 1024,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.9,
        pipeline: bool = False,
        max_in_flight: int = 2,
        threads_per_stage: int | None = None,
        pipeline_stages: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.lr = check_positive_float(lr, "lr")
        self.ae_lr = 2.0 * self.lr if ae_lr is None else check_positive_float(ae_lr, "ae_lr")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.eval_batch_size = check_positive_int(eval_batch_size, "eval_batch_size")
        self.schedule = None if schedule is None else check_choice(schedule, "schedule", SCHEDULES)
        self.optimizer = check_choice(optimizer, "optimizer", OPTIMIZERS)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.device = _resolve_device(device)
        self.progress = progress
        self.model = model.to(self.device)
        self.is_al = isinstance(model, AssociatedLearning)
        self.num_classes: int = getattr(model, "num_classes", 0)
        if self.num_classes < 2:
            raise ValueError("model must have a num_classes attribute of at least 2 (the number of classes)")

        self.fused = self.is_al and model.uses_fused_step()
        self.optimizers = self._make_optimizers()
        if pipeline and not self.is_al:
            raise ValueError("pipeline=True trains the blocks of an AssociatedLearning model; this model has none")
        if cuda_graphs and not pipeline:
            raise ValueError("cuda_graphs=True replays the pipeline's block steps; it needs pipeline=True")
        self.pipeline = (Pipeline(model, self.optimizers, max_in_flight, threads_per_stage, stages=pipeline_stages,
                                  cuda_graphs=cuda_graphs) if pipeline else None)
        # Each parameter group's own starting lr, which the NECO schedule scales.
        self._base_lrs: list[list[float]] = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]
        self._plateaus = (
            [torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=5) for opt in self.optimizers]
            if self.schedule == "plateau"
            else []
        )
        self._generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"epoch", "val_accuracy"} of the best epoch on validation
        self._best_state: dict[str, Tensor] | None = None

    def _make_optimizers(self) -> list[torch.optim.Optimizer]:
        model = self.model
        if self.fused:  # one op per block does forward, local losses, gradients and the update
            fused_optimizers: list[torch.optim.Optimizer] = []
            for i, block in enumerate(model.blocks):
                ae_loss = model.first_ae_loss if i == 0 else "mse"
                if self.optimizer == "adam":
                    fused_optimizers.append(FusedBlockAdam(block, self.lr, self.ae_lr, model.variant, ae_loss))
                else:
                    fused_optimizers.append(
                        FusedBlockSGD(block, self.lr, self.ae_lr, model.variant, ae_loss, self.momentum))
            return fused_optimizers
        if self.is_al:
            return [opt for fb, gh in model.parameter_groups()
                    for opt in (self._torch_optimizer(fb, self.lr), self._torch_optimizer(gh, self.ae_lr))]
        return [self._torch_optimizer(model.parameters(), self.lr)]

    def _torch_optimizer(self, params: Any, lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum)
        return torch.optim.Adam(params, lr=lr)

    # ---- data -------------------------------------------------------------------------

    def _check_pair(self, x: Any, y: Any, name: str) -> tuple[Tensor, Tensor]:
        vocab_size = getattr(self.model, "vocab_size", None)
        if vocab_size is not None:  # token ids: checked by the model's own rule, never cast
            x = check_token_batch(check_tensor(x, f"{name} inputs").to(self.device), self.device, vocab_size,
                                  f"{name} inputs")
            return x, check_labels(y, self.num_classes, f"{name} labels", length=x.shape[0]).to(self.device)
        x = check_float_tensor(x, f"{name} inputs")
        y = check_labels(y, self.num_classes, f"{name} labels", length=x.shape[0] if x.dim() else None)
        if x.dim() < 2:
            raise ValueError(f"{name} inputs must have samples along dim 0 and features after, got shape {tuple(x.shape)}")
        check_finite(x, f"{name} inputs")
        dtype = next(self.model.parameters()).dtype
        return x.to(self.device, dtype), y.to(self.device)

    def _prepared(self, data: Data, name: str) -> Data:
        if isinstance(data, DataLoader):
            return data
        if isinstance(data, (tuple, list)) and len(data) == 2:
            return self._check_pair(data[0], data[1], name)
        raise TypeError(f"{name} must be an (inputs, labels) pair of tensors or a DataLoader, got {type(data).__name__}")

    def _batches(self, data: Data, name: str, batch_size: int, shuffle: bool) -> Iterator[tuple[Tensor, Tensor]]:
        if isinstance(data, DataLoader):
            for batch in data:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise TypeError(f"{name}: the DataLoader must yield (inputs, labels) pairs")
                yield self._check_pair(batch[0], batch[1], name)
            return
        x, y = data
        n = x.shape[0]
        order = torch.randperm(n, generator=self._generator).to(self.device) if shuffle else None
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
            yield x[idx], y[idx]

    @staticmethod
    def _num_batches(data: Data, batch_size: int) -> int:
        return len(data) if isinstance(data, DataLoader) else -(-data[0].shape[0] // batch_size)

    # ---- training ----------------------------------------------------------------------

    def _train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One update; returns the losses, (L, 2) of (L_as, L_ae) for AL or (1,) for BP."""
        self.model.train()
        if self.fused:
            return self._fused_train_step(x, y)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.is_al:
            blocks = self.model.local_losses(x, y)
            # One backward pass of the sum: the blocks' inputs are detached, so each loss
            # still reaches only its own block's parameters.
            sum(b.loss_as + b.loss_ae for b in blocks).backward()
            values = torch.stack([torch.stack([b.loss_as, b.loss_ae]) for b in blocks]).detach()
        else:
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            values = loss.detach().reshape(1)
        if not bool(torch.isfinite(values).all()):
            raise FloatingPointError(self._describe_non_finite(values))
        for opt in self.optimizers:
            opt.step()
        return values

    def _fused_train_step(self, x: Tensor, y: Tensor) -> Tensor:
        s, t = self.model.check_input(x), self.model.label_targets(y)
        # On CUDA each block's kernel refuses a non-finite step by itself, so the losses are
        # checked once for the whole batch (one wait for the GPU), not after every block.
        on_cuda = s.is_cuda
        losses = []
        for i, opt in enumerate(self.optimizers):
            try:
                s, t, loss_as, loss_ae = opt.train_step(s, t, check_finite=not on_cuda)
            except RuntimeError as exc:
                if "non-finite loss" not in str(exc):
                    raise
                raise FloatingPointError(
                    f"non-finite loss in block {i + 1} in epoch {self.epoch + 1}; that block was not updated"
                    + (f", blocks 1-{i} were updated on this batch" if i else "") + f" ({exc})"
                ) from exc
            losses.append(torch.stack([loss_as, loss_ae]))
        values = torch.stack(losses)
        if on_cuda and not bool(torch.isfinite(values).all()):
            block = int((~torch.isfinite(values)).any(dim=1).nonzero()[0])
            raise FloatingPointError(
                f"non-finite loss in block {block + 1} in epoch {self.epoch + 1}; the GPU refused that block's "
                f"update (L_as = {values[block, 0].item()}, L_ae = {values[block, 1].item()})"
                + (f", blocks 1-{block} were updated on this batch" if block else "")
                + "; later blocks trained on its outputs only where their own losses were finite")
        return values

    def _describe_non_finite(self, values: Tensor) -> str:
        where = f"epoch {self.epoch + 1}"
        if not self.is_al:
            return f"non-finite cross-entropy loss ({values.item()}) in {where}; no update was applied"
        block, which = (int(i) for i in (~torch.isfinite(values)).nonzero()[0])
        name = ("L_as", "L_ae")[which]
        return (f"non-finite loss {name} = {values[block, which].item()} in block {block + 1} in {where}; "
                "no update was applied (lower the learning rate or check the data)")

    def step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """One update on one batch. Returns {"loss_as": [...], "loss_ae": [...]} per block for AL,
        {"loss": float} for BP."""
        x, y = self._check_pair(x, y, "batch")
        return self._loss_record(self._train_step(x, y))

    def _loss_record(self, values: Tensor) -> dict[str, Any]:
        if self.is_al:
            return {"loss_as": values[:, 0].tolist(), "loss_ae": values[:, 1].tolist()}
        return {"loss": values.item()}

    def _apply_lr_schedule(self, total_epochs: int) -> None:
        if self.schedule != "neco":
            return
        factor = neco_lr_factor(self.epoch, total_epochs)
        for opt, bases in zip(self.optimizers, self._base_lrs):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * factor

    def fit(
        self,
        train: Data,
        val: Data | None = None,
        epochs: int = 10,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        checkpoint: str | Path | None = None,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done in all (so a resumed run continues where it stopped).

        Returns the history, one record per epoch: mean losses (per block for AL), samples/s
        and wall time of the training pass, learning rate, and validation accuracy (per
        shortcut depth for AL) when ``val`` is given. The best epoch on ``val`` is kept in
        ``self.best`` and restored by ``restore_best()``; the test split is never looked at.
        With ``checkpoint``, the state is saved there after every epoch: ``load`` it into a
        new trainer and call ``fit`` with the same ``epochs`` to finish an interrupted run
        exactly as it would have finished.
        """
        check_positive_int(epochs, "epochs")
        train = self._prepared(train, "train")
        val = None if val is None else self._prepared(val, "val")
        while self.epoch < epochs:
            self._apply_lr_schedule(epochs)
            record = self._train_epoch(train, epochs)
            if val is not None:
                self._validate(val, record)
            self.epoch += 1
            self.history.append(record)
            if checkpoint is not None:
                self.save(checkpoint)
            if on_epoch is not None:
                on_epoch(record)
        return self.history

    def _train_epoch(self, train: Data, total_epochs: int) -> dict[str, Any]:
        if self.pipeline is not None:
            return self._train_epoch_pipelined(train)
        total: Tensor | None = None
        samples = 0
        # progress None: a bar only when writing to a terminal (tqdm's disable=None).
        bar = tqdm(total=self._num_batches(train, self.batch_size), desc=f"epoch {self.epoch + 1}/{total_epochs}",
                   unit="batch", leave=False, disable=None if self.progress is None else not self.progress)
        start = time.perf_counter()
        for x, y in self._batches(train, "train", self.batch_size, shuffle=True):
            values = self._train_step(x, y)
            total = values * x.shape[0] if total is None else total + values * x.shape[0]
            samples += x.shape[0]
            bar.update(1)
        elapsed = time.perf_counter() - start
        bar.close()
        if total is None:
            raise ValueError("train holds no samples")
        record: dict[str, Any] = {"epoch": self.epoch + 1}
        record.update(self._loss_record(total / samples))
        record.update(samples_per_s=samples / elapsed, train_time_s=elapsed, lr=self.optimizers[0].param_groups[0]["lr"])
        return record

    def _train_epoch_pipelined(self, train: Data) -> dict[str, Any]:
        batches = list(self._batches(train, "train", self.batch_size, shuffle=True))
        if not batches:
            raise ValueError("train holds no samples")
        start = time.perf_counter()
        try:
            run = self.pipeline.run(batches)
        except PipelineError as exc:
            if "non-finite loss" in str(exc):
                raise FloatingPointError(f"{exc} (epoch {self.epoch + 1}; earlier batches were trained)") from exc
            raise
        elapsed = time.perf_counter() - start
        sizes = torch.tensor([float(x.shape[0]) for x, _ in batches], dtype=torch.float64)
        mean = (run.losses * sizes[:, None, None]).sum(0) / sizes.sum()
        record: dict[str, Any] = {"epoch": self.epoch + 1}
        record.update(self._loss_record(mean))
        record.update(samples_per_s=float(sizes.sum()) / elapsed, train_time_s=elapsed,
                      lr=self.optimizers[0].param_groups[0]["lr"],
                      stage_idle_fraction=[s["idle_fraction"] for s in run.stages])
        return record

    def _validate(self, val: Data, record: dict[str, Any]) -> None:
        metrics = self.evaluate(val)
        record["val_accuracy"] = metrics["accuracy"]
        if self.is_al:
            record["val_shortcut_accuracy"] = metrics["shortcut_accuracy"]
        if self.best is None or metrics["accuracy"] > self.best["val_accuracy"]:
            self.best = {"epoch": self.epoch + 1, "val_accuracy": metrics["accuracy"]}
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for plateau in self._plateaus:
            plateau.step(metrics["accuracy"])

    def restore_best(self) -> None:
        """Load the parameters of the best epoch on the validation data."""
        if self._best_state is None:
            raise RuntimeError("no validation data has been seen: pass val= to fit() to select a best epoch")
        self.model.load_state_dict(self._best_state)

    @torch.no_grad()
    def evaluate(self, data: Data) -> dict[str, Any]:
        """Accuracy on ``data``; for AL also the accuracy of every shortcut depth 1..L
        (``shortcut_accuracy[-1]`` is the full path, equal to ``accuracy``)."""
        data = self._prepared(data, "data")
        was_training = self.model.training
        self.model.eval()
        correct: Tensor | None = None
        samples = 0
        for x, y in self._batches(data, "data", self.eval_batch_size, shuffle=False):
            scores = self.model.shortcut_scores(x) if self.is_al else [self.model(x)]
            hits = torch.stack([(s.argmax(dim=1) == y).sum() for s in scores])
            correct = hits if correct is None else correct + hits
            samples += x.shape[0]
        self.model.train(was_training)
        if correct is None:
            raise ValueError("data holds no samples")
        accuracy = (correct.double() / samples).tolist()
        result: dict[str, Any] = {"accuracy": accuracy[-1], "samples": samples}
        if self.is_al:
            result["shortcut_accuracy"] = accuracy
        return result

    # ---- checkpoints -------------------------------------------------------------------

    def _signature(self) -> dict[str, list[int]]:
        return {name: list(t.shape) for name, t in self.model.state_dict().items()}

    def save(self, path: str | Path) -> None:
        """Everything needed to continue the run exactly: parameters, optimiser and schedule
        states, epoch, history, best epoch, and the random number generators' states."""
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "model_class": type(self.model).__name__,
                "signature": self._signature(),
                "model": self.model.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "plateaus": [p.state_dict() for p in self._plateaus],
                "base_lrs": self._base_lrs,
                "epoch": self.epoch,
                "history": self.history,
                "best": self.best,
                "best_state": self._best_state,
                "generator": self._generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
            path,
        )

    def load(self, path: str | Path) -> None:
        """Continue from a checkpoint written by ``save`` for a model of the same architecture."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is not a readable al_ext checkpoint ({exc})") from exc
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an al_ext checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        self._check_architecture(ckpt, path)
        self.model.load_state_dict(ckpt["model"])
        for opt, state in zip(self.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        for plateau, state in zip(self._plateaus, ckpt["plateaus"]):
            plateau.load_state_dict(state)
        self._base_lrs = [list(bases) for bases in ckpt["base_lrs"]]
        self.epoch = ckpt["epoch"]
        self.history = copy.deepcopy(ckpt["history"])
        self.best = ckpt["best"]
        self._best_state = ckpt["best_state"]
        self._generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])

    def _check_architecture(self, ckpt: dict[str, Any], path: str | Path) -> None:
        if ckpt["model_class"] != type(self.model).__name__:
            raise ValueError(f"{path} was saved from a {ckpt['model_class']}, but this trainer holds a "
                             f"{type(self.model).__name__}")
        ours, theirs = self._signature(), ckpt["signature"]
        problems = [f"{k}: {theirs.get(k)} in the checkpoint, {ours.get(k)} in this model"
                    for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise ValueError(f"{path} holds a model of another architecture: {shown}")
        if len(ckpt["optimizers"]) != len(self.optimizers) or len(ckpt["plateaus"]) != len(self._plateaus):
            raise ValueError(f"{path} was saved by a trainer with other optimisers or schedule "
                             f"({len(ckpt['optimizers'])} optimisers, schedule {'plateau' if ckpt['plateaus'] else 'none/neco'})")
