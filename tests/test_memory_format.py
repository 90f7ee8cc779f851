"""The engines put a conv model's 4-D parameters in channels_last on the CPU (faster there),
without changing a value, and the bridges' flatten hands its gradient back in the map's layout."""
import torch
import torch.nn.functional as F

import al_ext
from al_ext.engines import make_engine
from al_ext.memory_format import prefers_channels_last
from al_ext.models import ALCNN, FlattenMap


def small_cnn() -> ALCNN:
    torch.manual_seed(0)
    return ALCNN((1, 8, 8), 3, channels=((4, 4), (4, 4)), strides=(1, 2), label_dim=8)


def test_an_engine_puts_a_conv_model_in_channels_last_without_changing_a_value():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    engine = make_engine(model, "adam", 1e-3)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # (a weight of one input channel is both)
    assert [id(p) for p in model.parameters()] == ids  # the optimisers' parameters are the model's
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    x, y = torch.rand(5, 64), torch.tensor([0, 1, 2, 0, 1])
    losses = engine.step(x, y)
    assert torch.isfinite(losses).all()


def test_a_model_without_convolutions_keeps_its_layout():
    model = al_ext.ALMLP(12, 3, hidden=(8, 8), label_dim=8)
    assert not prefers_channels_last(model, torch.device("cpu"))
    make_engine(model, "adam", 1e-3)
    assert all(p.is_contiguous() for p in model.parameters())


def test_channels_last_computes_the_losses_and_gradients_of_nchw():
    x, y = torch.rand(6, 64), torch.tensor([0, 1, 2, 0, 1, 2])
    nchw, channels_last = small_cnn(), small_cnn().to(memory_format=torch.channels_last)
    for model in (nchw, channels_last):
        sum(b.loss_as + b.loss_ae for b in model.local_losses(x, y)).backward()
    for (name, a), b in zip(nchw.named_parameters(), channels_last.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
        assert b.grad.is_contiguous(memory_format=torch.channels_last) or b.dim() != 4, name


def test_flatten_map_hands_the_gradient_back_in_the_maps_layout():
    for memory_format in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 3, 4, 5).contiguous(memory_format=memory_format).requires_grad_()
        out = FlattenMap()(x)
        assert torch.equal(out, x.detach().flatten(1))
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        assert torch.equal(x.grad, weights.reshape(2, 3, 4, 5))
        assert x.grad.is_contiguous(memory_format=memory_format)


def test_flatten_map_in_a_loss_matches_nn_flatten():
    x = torch.randn(3, 2, 4, 4).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.mse_loss(FlattenMap()(F.elu(a)), torch.zeros(3, 32)).backward()
    F.mse_loss(torch.nn.Flatten()(F.elu(b)), torch.zeros(3, 32)).backward()
    torch.testing.assert_close(a.grad, b.grad)
