"""Trainer: per-loss optimisers, learning, model selection on validation, exact resume, bad input."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import al_ext
from al_ext import Trainer, bp_baseline
from al_ext.train import neco_lr_factor

from conftest import small_mlp


@pytest.fixture(scope="module")
def digits():
    x, y = al_ext.data.load_digits()
    return al_ext.data.split_dataset(x, y, val=0.15, test=0.15, seed=0)


def digits_mlp(seed=0, **kwargs):
    torch.manual_seed(seed)
    return al_ext.ALMLP(64, 10, hidden=(64, 64), label_dim=64, bridge_factor=2, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_al_optimisers_split_each_block_into_f_b_and_g_h(backend):
    model = small_mlp(backend=backend)
    trainer = Trainer(model, lr=1e-3)
    groups = [g for opt in trainer.optimizers for g in opt.param_groups]
    assert len(groups) == 2 * model.depth
    assert len(trainer.optimizers) == (model.depth if backend == "fused" else 2 * model.depth)
    for i, block in enumerate(model.blocks):
        fb, gh = groups[2 * i], groups[2 * i + 1]
        assert fb["lr"] == 1e-3 and gh["lr"] == 2e-3
        assert {id(p) for p in fb["params"]} == {id(p) for p in [*block.f.parameters(), *block.b.parameters()]}
        assert {id(p) for p in gh["params"]} == {id(p) for p in [*block.g.parameters(), *block.h.parameters()]}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("variant", ["A", "B"])
def test_step_equals_per_loss_adam_on_the_reference_gradients(variant):
    model = small_mlp(variant=variant).double()
    twin = small_mlp(variant=variant).double()
    x = torch.randn(8, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    losses = Trainer(model, lr=1e-2, ae_lr=3e-2).step(x, y)
    assert len(losses["loss_as"]) == len(losses["loss_ae"]) == 2
    s, t = x, twin.label_targets(y)
    for block in twin.blocks:
        grads = al_ext.reference.local_gradients(block, s, t, variant)
        s, t = grads.s, grads.t
        as_names, ae_names = al_ext.reference.updated_parameters(block, variant)
        params = dict(block.named_parameters())
        total = grads.total()
        for p in params.values():
            p.grad = None
        for name, p in params.items():
            p.grad = total[name]
        fb = [params[n] for n in params if n.split(".")[0] in ("f", "b")]
        gh = [params[n] for n in params if n.split(".")[0] in ("g", "h")]
        torch.optim.Adam(fb, lr=1e-2).step()
        torch.optim.Adam(gh, lr=3e-2).step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_al_and_bp_learn_digits(digits):
    model = digits_mlp(first_ae_loss="cross_entropy")
    baseline = bp_baseline(model)
    al = Trainer(model, lr=2e-3, batch_size=64, progress=False)
    history = al.fit(digits.train, digits.val, epochs=8)
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert len(history[-1]["loss_as"]) == 2 and history[-1]["samples_per_s"] > 0
    assert history[-1]["loss_ae"][0] < history[0]["loss_ae"][0]
    result = al.evaluate(digits.test)
    assert result["accuracy"] > 0.85 and len(result["shortcut_accuracy"]) == 2
    assert result["shortcut_accuracy"][-1] == result["accuracy"]
    bp = Trainer(baseline, lr=2e-3, batch_size=64, progress=False)
    bp.fit(digits.train, digits.val, epochs=8)
    assert bp.evaluate(digits.test)["accuracy"] > 0.85


def test_backends_train_alike(digits):
    results = []
    for backend in ("auto", "reference"):
        trainer = Trainer(digits_mlp(backend=backend), batch_size=64, progress=False)
        trainer.fit(digits.train, epochs=2)
        results.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_best_epoch_is_chosen_on_validation(digits):
    trainer = Trainer(digits_mlp(), batch_size=64, progress=False)
    history = trainer.fit(digits.train, digits.val, epochs=4)
    best = max(history, key=lambda r: r["val_accuracy"])
    assert trainer.best == {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"]}
    trainer.restore_best()
    assert trainer.evaluate(digits.val)["accuracy"] == best["val_accuracy"]


def test_restore_best_without_validation_says_why():
    trainer = Trainer(small_mlp(), progress=False)
    with pytest.raises(RuntimeError, match="pass val= to fit"):
        trainer.restore_best()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_run(a, b):
    for x, y in zip(params_of(a.model), params_of(b.model)):
        assert torch.equal(x, y)
    assert [r["loss_as"] for r in a.history] == [r["loss_as"] for r in b.history]
    assert a.best == b.best


class Interrupt(Exception):
    pass


def interrupt_after(epoch):
    def on_epoch(record):
        if record["epoch"] == epoch:
            raise Interrupt

    return on_epoch


@pytest.mark.parametrize("schedule", [None, "neco", "plateau"])
def test_interrupted_run_resumes_bit_exact(tmp_path, digits, schedule):
    whole = Trainer(digits_mlp(), batch_size=64, schedule=schedule, progress=False)
    whole.fit(digits.train, digits.val, epochs=4)

    first = Trainer(digits_mlp(), batch_size=64, schedule=schedule, progress=False)
    with pytest.raises(Interrupt):
        first.fit(digits.train, digits.val, epochs=4, checkpoint=tmp_path / "run.pt", on_epoch=interrupt_after(2))
    resumed = Trainer(digits_mlp(seed=123), batch_size=64, schedule=schedule, progress=False)
    resumed.load(tmp_path / "run.pt")
    assert resumed.epoch == 2
    resumed.fit(digits.train, digits.val, epochs=4)
    assert_same_run(whole, resumed)


def test_fit_continues_to_the_total_number_of_epochs(tmp_path, digits):
    whole = Trainer(digits_mlp(), batch_size=64, progress=False)
    whole.fit(digits.train, digits.val, epochs=3)
    part = Trainer(digits_mlp(), batch_size=64, progress=False)
    part.fit(digits.train, digits.val, epochs=1)
    part.save(tmp_path / "ckpt.pt")
    resumed = Trainer(digits_mlp(seed=7), batch_size=64, progress=False)
    resumed.load(tmp_path / "ckpt.pt")
    resumed.fit(digits.train, digits.val, epochs=3)
    assert_same_run(whole, resumed)


def test_neco_schedule():
    assert [neco_lr_factor(e, 10) for e in range(10)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.0005])
    trainer = Trainer(small_mlp(), lr=1e-2, schedule="neco", progress=False)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    history = trainer.fit((x, y), epochs=5)
    assert [r["lr"] for r in history] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4, 1e-5])
    groups = [g for opt in trainer.optimizers for g in opt.param_groups]
    # Stepped after each epoch, the schedule leaves the rate of a sixth epoch (x0.0005 at 100 %).
    assert [g["lr"] for g in groups[:2]] == pytest.approx([5e-6, 1e-5]), "each group keeps its own base lr"


def test_dataloader_input_and_bp_history(digits):
    x, y = digits.train
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=False)
    trainer = Trainer(bp_baseline(digits_mlp()), progress=False)
    history = trainer.fit(loader, epochs=1)
    assert set(history[0]) >= {"epoch", "loss", "samples_per_s", "train_time_s", "lr"}
    assert trainer.evaluate(loader)["samples"] == x.shape[0]


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    Trainer(small_mlp(), progress=False).save(tmp_path / "small.pt")
    other = Trainer(small_mlp(hidden=(24, 17)), progress=False)
    with pytest.raises(ValueError, match="another architecture: .*blocks.1.f.0.weight"):
        other.load(tmp_path / "small.pt")
    bp = Trainer(bp_baseline(small_mlp()), progress=False)
    with pytest.raises(ValueError, match="was saved from a ALMLP"):
        bp.load(tmp_path / "small.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable al_ext checkpoint"):
        other.load(tmp_path / "junk.pt")


class Explode(nn.Module):
    def forward(self, x):
        return x * float("inf")


def test_non_finite_loss_stops_before_any_update():
    model = small_mlp()
    model.blocks[1].b = nn.Sequential(Explode(), model.blocks[1].b)
    before = params_of(model)
    trainer = Trainer(model, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite loss L_as = nan in block 2"):
        trainer.step(torch.randn(4, 20), torch.tensor([0, 1, 2, 3]))
    for a, b in zip(before, params_of(model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "data,error,message",
    [
        ((torch.randn(6, 20), torch.tensor([0, 1, 2, 3, 4, 5])), ValueError, r"train labels must lie in \[0, 5\)"),
        ((torch.randn(6, 20), torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, r"got values from -1 to 4"),
        ((torch.randn(6, 20), torch.zeros(6)), TypeError, "train labels must hold integer class labels"),
        ((torch.randn(6, 20), torch.zeros(5, dtype=torch.long)), ValueError, r"one label per sample \(6\), got 5"),
        ((torch.full((6, 20), float("nan")), torch.zeros(6, dtype=torch.long)), ValueError, "train inputs contains 120 NaN"),
        ((torch.ones(6, 20, dtype=torch.long), torch.zeros(6, dtype=torch.long)), TypeError, "train inputs must be a floating"),
        ((torch.randn(6, 21), torch.zeros(6, dtype=torch.long)), ValueError, "x must have 20 features"),
        ([torch.randn(6, 20)], TypeError, r"train must be an \(inputs, labels\) pair"),
    ],
)
def test_bad_training_data(data, error, message):
    with pytest.raises(error, match=message):
        Trainer(small_mlp(), progress=False).fit(data, epochs=1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": 0.0}, "lr must be a positive finite number"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"schedule": "cosine"}, "schedule must be one of"),
        ({"device": "nonsense"}, "device must name a torch device"),
    ],
)
def test_bad_trainer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(small_mlp(), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_missing_cuda_device_is_reported():
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        Trainer(small_mlp(), device="cuda")
