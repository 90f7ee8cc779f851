"""The model zoo: every model trains, infers on every path, pipelines and has a BP baseline."""
import pytest
import torch

import al_ext
from al_ext import Trainer, bp_baseline
from al_ext.models import ALCNN, VGG_AL, ResNet_AL


def small(kind, **kwargs):
    """Models for 8x8 digits; pooled bridges need some channels to see anything."""
    torch.manual_seed(0)
    options = dict(label_dim=16, bridge_factor=2, **kwargs)
    if kind == "cnn":
        return ALCNN((1, 8, 8), channels=((4, 4), (4, 8), (8, 8)), strides=(1, 2, 2), **options)
    if kind == "vgg":
        return VGG_AL((1, 8, 8), stages=((16,), (32, 32)), **options)
    return ResNet_AL(8, (1, 8, 8), widths=(16, 32, 32), **options)


KINDS = ["cnn", "vgg", "resnet"]


@pytest.fixture(scope="module")
def digits():
    x, y = al_ext.data.load_digits()
    return al_ext.data.split_dataset(x, y, val=0.1, test=0.2, seed=0)


def test_neco_cnn_has_the_papers_shape():
    model = ALCNN()
    assert model.depth == 4
    shapes = [tuple(b.s.shape[1:]) for b in model.local_losses(torch.rand(2, 784), torch.tensor([0, 1]))]
    assert shapes == [(32, 28, 28), (32, 14, 14), (64, 14, 14), (64, 7, 7)]
    assert model.blocks[0].b[1].in_features == 32 * 28 * 28 and model.blocks[0].b[1].out_features == 1280
    assert model.blocks[0].b[3].out_features == 256
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("depth,units", [(20, 3), (32, 5)])
def test_resnet_depths(depth, units):
    model = ResNet_AL(depth)
    assert model.depth == 3 and all(
        sum(isinstance(m, al_ext.models.BasicBlock) for m in block.f.modules()) == units for block in model.blocks)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_every_inference_path_and_the_bp_baseline(kind):
    model = small(kind).eval()
    x = torch.rand(6, 64)
    assert model(x).shape == (6, 10) and torch.equal(model(x.reshape(6, 1, 8, 8)), model(x))
    assert [s.shape for s in model.shortcut_scores(x)] == [(6, 10)] * model.depth
    classes, depths = model.predict_adaptive(x, 0.5)
    assert classes.shape == (6,) and depths.min() >= 1 and depths.max() <= model.depth
    bp = bp_baseline(model).eval()
    torch.testing.assert_close(torch.sigmoid(bp(x)), model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_models_learn_digits(kind, digits):
    model = small(kind, first_ae_loss="cross_entropy")  # leaves the sigmoid plateau sooner
    trainer = Trainer(model, lr=2e-3, batch_size=32, progress=False)
    assert isinstance(trainer.engine, al_ext.engines.ALEngine), "conv blocks take the autograd path"
    history = trainer.fit(digits.train, digits.val, epochs=6)
    assert history[-1]["loss_ae"][0] < 0.5 * history[0]["loss_ae"][0]
    assert max(trainer.evaluate(digits.test)["shortcut_accuracy"]) > 0.6  # chance is 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_every_vision_model_pipelines_bit_for_bit(kind):
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for pipelined in (False, True):
            model = small(kind)
            trainer = Trainer(model, batch_size=8, progress=False, pipeline=pipelined, threads_per_stage=1,
                              pipeline_stages=model.depth if pipelined else None)
            trainer.fit((x, y), epochs=1)
            results.append([t.clone() for t in model.state_dict().values()])  # batch-norm statistics too
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ResNet_AL(21), r"depth must be 6n \+ 2"),
        (lambda: VGG_AL((3, 8, 8)), "too small for 5 stages"),
        (lambda: ALCNN((1, 28)), r"in_shape must be \(channels, height, width\)"),
        (lambda: ALCNN(channels=((4, 4),), strides=(1, 2)), "one entry per block"),
    ],
)
def test_bad_model_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
