"""Model API: blocks, the three inference paths, the NECO MLP and its BP baseline."""
import math

import pytest
import torch
from torch import nn

import al_ext
from al_ext import ALBlock, AssociatedLearning, bp_baseline

from conftest import small_mlp


def x_batch(n=11, seed=0):
    return torch.randn(n, 20, generator=torch.Generator().manual_seed(seed))


def test_full_path_is_the_composition_of_the_parts():
    model = small_mlp()
    x = x_batch()
    (b1, b2) = model.blocks
    expected = b1.h(b2.h(b2.b(b2.f(b1.f(x)))))
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model.scores(x, depth=1), b1.h(b1.b(b1.f(x))))
    assert torch.equal(model.predict(x), expected.argmax(1))
    assert torch.equal(model.predict(x, depth=1), b1.h(b1.b(b1.f(x))).argmax(1))
    scores = model.shortcut_scores(x)
    assert len(scores) == 2 and torch.equal(scores[-1], model(x))


@pytest.mark.parametrize("threshold", [1e-9, 0.3, 0.5, 0.7, 1.0])
def test_adaptive_path_exits_at_the_first_confident_depth(threshold):
    model = small_mlp(hidden=(24, 16, 12))
    x = x_batch(64)
    classes, depths = model.predict_adaptive(x, threshold)
    scores = model.shortcut_scores(x)
    for i in range(x.shape[0]):
        k = int(depths[i])
        assert classes[i] == scores[k - 1][i].argmax()
        for shallower in range(k - 1):
            assert model.confidence(scores[shallower][i : i + 1]) < threshold
        if k < model.depth:
            assert model.confidence(scores[k - 1][i : i + 1]) >= threshold
    if threshold == 1e-9:
        assert (depths == 1).all()


def test_any_four_modules_make_a_block():
    conv = ALBlock(
        f=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ELU()),
        g=nn.Sequential(nn.Linear(3, 8), nn.Sigmoid()),
        b=nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.Sigmoid()),
        h=nn.Sequential(nn.Linear(8, 3), nn.Sigmoid()),
    )
    model = AssociatedLearning([conv], num_classes=3)
    x, y = torch.randn(6, 1, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    (losses,) = model.local_losses(x, y)
    assert losses.s.shape == (6, 4, 5, 5) and losses.t.shape == (6, 8)
    assert model(x).shape == (6, 3)


def test_neco_mlp_has_the_papers_size():
    model = al_ext.ALMLP(784, 10)
    d, c = 1024, 10

    def linear(i, o):
        return i * o + o

    block1 = linear(784, 1024) + linear(c, d) + linear(1024, 5 * d) + linear(5 * d, d) + linear(d, c)
    block2 = linear(1024, 1024) + linear(d, d) + linear(1024, 5 * d) + linear(5 * d, d) + linear(d, d)
    assert sum(p.numel() for p in model.parameters()) == block1 + block2  # about 25 M, mostly the bridges
    assert isinstance(model.blocks[0].h[-1], nn.Sigmoid) and isinstance(model.blocks[0].f[-1], nn.ELU)
    w = model.blocks[0].f[1].weight
    assert abs(w.std().item() - math.sqrt(2 / 784)) < 0.002, "He-normal initialisation"


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_mlp_x_side_activation_keeps_the_fused_step(activation):
    model = small_mlp(activation=activation)
    assert type(model.blocks[1].f[-1]).__name__.lower() == activation and model.uses_fused_step()
    assert al_ext.fused.dense_block_layout(model.blocks[0])[1] == activation


def test_neco_mlp_flattens_images():
    model = al_ext.ALMLP(16, 3, hidden=(8,), label_dim=4)
    assert model(torch.randn(5, 1, 4, 4)).shape == (5, 3)


def test_bp_baseline_is_the_inference_path_as_its_own_copy():
    model = small_mlp()
    bp = bp_baseline(model)
    x = x_batch()
    torch.testing.assert_close(torch.sigmoid(bp(x)), model(x))  # h_1's sigmoid is left out: CE sees logits
    path = [*model.blocks[0].f.parameters(), *model.blocks[1].f.parameters(), *model.blocks[1].b.parameters(),
            *model.blocks[1].h.parameters(), *model.blocks[0].h.parameters()]
    assert sum(p.numel() for p in bp.parameters()) == sum(p.numel() for p in path)
    with torch.no_grad():
        next(bp.parameters()).add_(1.0)
    assert not torch.allclose(torch.sigmoid(bp(x)), model(x)), "the baseline must not share parameters"


def test_cross_entropy_model_keeps_logits_and_softmax_confidence():
    model = small_mlp(first_ae_loss="cross_entropy")
    assert not isinstance(model.blocks[0].h[-1], nn.Sigmoid)
    scores = model(x_batch())
    torch.testing.assert_close(model.confidence(scores), scores.softmax(1).max(1).values)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda m: m(torch.randn(4, 21)), ValueError, "x must have 20 features per sample"),
        (lambda m: m(torch.randn(4, 20, dtype=torch.float64)), TypeError, "x must have the model's dtype"),
        (lambda m: m(torch.ones(4, 20, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
        (lambda m: m(torch.randn(4, 20, device="meta")), ValueError, "x must be on cpu"),
        (lambda m: m(torch.randn(0, 20)), ValueError, "non-empty batch"),
        (lambda m: m([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda m: m.predict(torch.randn(4, 20), depth=3), ValueError, r"depth must be an integer in \[1, 2\]"),
        (lambda m: m.predict_adaptive(torch.randn(4, 20), float("nan")), ValueError, "threshold must be a confidence in"),
    ],
)
def test_bad_model_input(call, error, message):
    with pytest.raises(error, match=message):
        call(small_mlp())


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: AssociatedLearning([], 3), ValueError, "at least one ALBlock"),
        (lambda: AssociatedLearning([nn.Linear(2, 2)], 3), TypeError, r"blocks\[0\] must be an ALBlock"),
        (lambda: ALBlock(nn.Linear(2, 2), "g", nn.Linear(2, 2), nn.Linear(2, 2)), TypeError, "g must be an nn.Module"),
        (lambda: small_mlp(variant="C"), ValueError, "variant must be one of 'A', 'B'"),
        (lambda: small_mlp(backend="fast"), ValueError, "backend must be one of"),
        (lambda: small_mlp(hidden=()), ValueError, "hidden must list at least one width"),
        (lambda: small_mlp(hidden=(8, 0)), ValueError, r"hidden\[1\] must be a positive integer"),
        (lambda: al_ext.ALMLP(20, 1), ValueError, "num_classes must be at least 2"),
        (lambda: small_mlp(activation="gelu"), ValueError, "activation must be one of 'elu', 'relu', 'sigmoid', 'tanh'"),
        (lambda: bp_baseline(nn.Linear(2, 2)), TypeError, "model must be an AssociatedLearning"),
    ],
)
def test_bad_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()
