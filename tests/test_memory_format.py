"""The engines put a conv model's 4-D tensors in channels_last on the CPU (faster there)
without changing a value, optimiser state loaded in another layout follows its parameter, and
the bridges' flatten hands its gradient back in the map's layout."""
import pytest
import torch
import torch.nn.functional as F

import al_ext
from al_ext.engines import make_engine
from al_ext.memory_format import match_state_layouts, prefers_channels_last, use_fastest_memory_format
from al_ext.models import ALCNN, FlattenMap

CL = torch.channels_last


def small_cnn() -> ALCNN:
    torch.manual_seed(0)
    return ALCNN((1, 8, 8), 3, channels=((4, 4), (4, 4)), strides=(1, 2), label_dim=8)


def batch():
    return torch.rand(6, 64), torch.tensor([0, 1, 2, 0, 1, 2])


def test_an_engine_puts_a_conv_model_in_channels_last_without_changing_a_value():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    engine = make_engine(model, "adam", 1e-3)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=CL) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # (a weight of one input channel is both)
    assert [id(p) for p in model.parameters()] == ids  # the optimisers' parameters are the model's
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.isfinite(engine.step(*batch())).all()


def test_a_model_without_convolutions_is_left_alone():
    assert not prefers_channels_last(al_ext.ALMLP(12, 3, hidden=(8, 8), label_dim=8), torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Unflatten(1, (1, 2, 2)))
    model.register_buffer("map", torch.zeros(2, 3, 4, 5))
    use_fastest_memory_format(model)
    assert model.map.is_contiguous()


def test_a_1x1_kernel_or_one_input_channel_gets_channels_last_strides():
    """Such weights are "contiguous" in both layouts; the convolution reads the strides to pick
    its layout, so they must be channels_last's, or a ResNet's shortcut runs NCHW."""
    model = torch.nn.ModuleDict({"one_by_one": torch.nn.Conv2d(4, 8, 1), "one_channel": torch.nn.Conv2d(1, 8, 3)})
    use_fastest_memory_format(model)
    for conv in model.values():
        assert conv.weight.stride() == torch.empty_like(conv.weight, memory_format=CL).stride()


def test_only_4d_tensors_change_layout_so_a_conv3d_beside_a_conv2d_is_fine():
    model = torch.nn.ModuleDict({"c2": torch.nn.Conv2d(2, 3, 3), "c3": torch.nn.Conv3d(2, 3, 3)})
    model["c2"].weight.grad = torch.ones_like(model["c2"].weight)
    use_fastest_memory_format(model)
    assert model["c2"].weight.is_contiguous(memory_format=CL) and not model["c2"].weight.is_contiguous()
    assert model["c2"].weight.grad.stride() == model["c2"].weight.stride()
    assert model["c3"].weight.is_contiguous()


def test_channels_last_computes_the_losses_and_gradients_of_nchw():
    x, y = batch()
    nchw, channels_last = small_cnn(), small_cnn()
    use_fastest_memory_format(channels_last)
    for model in (nchw, channels_last):
        sum(b.loss_as + b.loss_ae for b in model.local_losses(x, y)).backward()
    for (name, a), b in zip(nchw.named_parameters(), channels_last.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_optimiser_state_loaded_in_another_layout_takes_its_parameters():
    """A checkpoint of an NCHW run, loaded by an engine that made its model channels_last: the
    loaded Adam state takes each parameter's layout."""
    x, y = batch()
    nchw = small_cnn()
    opts = [torch.optim.Adam(group, lr=1e-2, fused=True) for pair in nchw.parameter_groups() for group in pair]
    sum(b.loss_as + b.loss_ae for b in nchw.local_losses(x, y)).backward()
    for opt in opts:
        opt.step()
    engine = make_engine(small_cnn(), "adam", 1e-2)
    engine.load_state_dict({"optimizers": [opt.state_dict() for opt in opts], "schedulers": [],
                            "precision": engine.precision.state_dict()})
    layouts = [(state["exp_avg"].stride(), state["exp_avg_sq"].stride(), p.stride())
               for opt in engine.optimizers for p, state in opt.state.items()]
    assert any(not p.is_contiguous() for opt in engine.optimizers for p in opt.state)  # some are channels_last
    assert all(avg == avg_sq == param for avg, avg_sq, param in layouts)


def test_fused_adam_over_state_matched_to_a_channels_last_weight_steps_as_single_tensor_adam():
    """Why the layouts must match: torch's fused CPU Adam pairs a parameter with its state by
    flat memory offset."""
    torch.manual_seed(0)
    weight, grad = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    state = {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4, 2, 5), "exp_avg_sq": torch.rand(3, 4, 2, 5) + 0.1}
    results = []
    for fused in (True, False):
        p = torch.nn.Parameter(weight.clone().contiguous(memory_format=CL) if fused else weight.clone())
        p.grad = grad.clone().contiguous(memory_format=CL) if fused else grad.clone()
        opt = torch.optim.Adam([p], lr=1e-2, fused=fused, foreach=False if not fused else None)
        opt.load_state_dict({"state": {0: {k: v.clone() for k, v in state.items()}},
                             "param_groups": [{**opt.param_groups[0], "params": [0]}]})
        match_state_layouts(opt)
        opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1])


def test_match_state_layouts_copies_values_into_the_parameters_layout():
    weight = torch.nn.Parameter(torch.randn(2, 3, 4, 5).contiguous(memory_format=CL))
    opt = torch.optim.SGD([weight], lr=1.0, momentum=0.9)
    nchw = torch.randn(2, 3, 4, 5)
    opt.state[weight]["momentum_buffer"] = nchw
    match_state_layouts(opt)
    buffer = opt.state[weight]["momentum_buffer"]
    assert buffer.stride() == weight.stride() and torch.equal(buffer, nchw)


def test_flatten_map_hands_the_gradient_back_in_the_maps_layout():
    for memory_format in (CL, torch.contiguous_format):
        x = torch.randn(2, 3, 4, 5).contiguous(memory_format=memory_format).requires_grad_()
        y = F.elu(x)  # a non-leaf: its gradient is what FlattenMap's backward returns, layout and all
        out = FlattenMap()(y)
        assert torch.equal(out, y.detach().flatten(1))
        weights = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, y, weights)
        assert torch.equal(grad, weights.reshape(2, 3, 4, 5))
        assert grad.is_contiguous(memory_format=memory_format), memory_format


def test_flatten_map_of_an_nchw_map_is_a_plain_view():
    y = torch.randn(2, 3, 4, 5, requires_grad=True) * 1.0
    out = FlattenMap()(y)
    assert out._base is y
    out.add_(1.0)  # nn.Flatten's output takes in-place ops; so does this one


def test_flatten_map_flattens_from_dim_one_only():
    with pytest.raises(TypeError):
        FlattenMap(start_dim=2)
