"""The executable specification: what each local loss updates, and that nothing crosses a block."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from al_ext import ops, reference

from conftest import small_mlp


def block_inputs(model, x, y, index):
    """(s_{i-1}, t_{i-1}) for block ``index`` of ``model``."""
    s, t = x, model.label_targets(y)
    for block in model.blocks[:index]:
        s, t = block(s, t)
    return s.detach(), t.detach()


def batch(n=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def part_of(name):
    return name.split(".", 1)[0]


@pytest.mark.parametrize("variant,as_parts", [("A", {"f", "b"}), ("B", {"f", "b", "g"})])
def test_each_loss_updates_exactly_its_parameters(variant, as_parts):
    model = small_mlp(variant=variant)
    x, y = batch()
    for i, block in enumerate(model.blocks):
        s_prev, t_prev = block_inputs(model, x, y, i)
        result = reference.local_gradients(block, s_prev, t_prev, variant)
        assert {part_of(n) for n in result.grads_as} == as_parts
        assert {part_of(n) for n in result.grads_ae} == {"g", "h"}
        for name, grad in {**result.grads_as, **result.grads_ae}.items():
            assert grad.abs().sum() > 0, f"block {i}: {name} got no gradient"
        # Parameters outside a loss's share get nothing from it.
        losses = reference.local_losses(block, s_prev, t_prev, variant)
        params = dict(block.named_parameters())
        outside_as = [n for n in params if part_of(n) not in as_parts]
        for g in torch.autograd.grad(losses.loss_as, [params[n] for n in outside_as], allow_unused=True):
            assert g is None or g.abs().sum() == 0
        outside_ae = [n for n in params if part_of(n) in ("f", "b")]
        for g in torch.autograd.grad(losses.loss_ae, [params[n] for n in outside_ae], allow_unused=True):
            assert g is None or g.abs().sum() == 0


@pytest.mark.parametrize("variant", ["A", "B"])
def test_no_gradient_crosses_a_block(variant):
    model = small_mlp(variant=variant)
    x, y = batch()
    losses = model.local_losses(x, y)
    for i, later in enumerate(losses):
        earlier_params = [p for block in model.blocks[:i] for p in block.parameters()]
        if not earlier_params:
            continue
        for loss in (later.loss_as, later.loss_ae):
            for g in torch.autograd.grad(loss, earlier_params, retain_graph=True, allow_unused=True):
                assert g is None
    s_prev = torch.randn(4, 20, requires_grad=True)
    t_prev = torch.rand(4, 5, requires_grad=True)
    out = reference.local_losses(model.blocks[0], s_prev, t_prev, variant)
    (out.loss_as + out.loss_ae).backward()
    assert s_prev.grad is None and t_prev.grad is None


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_model_training_pass_gives_the_reference_gradients(variant, backend):
    model = small_mlp(variant=variant, backend=backend).double()
    x, y = batch()
    x = x.double()
    sum(b.loss_as + b.loss_ae for b in model.local_losses(x, y)).backward()
    for i, block in enumerate(model.blocks):
        s_prev, t_prev = block_inputs(model, x, y, i)
        expected = reference.local_gradients(block, s_prev, t_prev, variant).total()
        for name, p in block.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=f"block {i} {name}")


def test_local_losses_follow_the_definition():
    model = small_mlp()
    x, y = batch()
    block = model.blocks[0]
    t0 = model.label_targets(y)
    out = reference.local_losses(block, x, t0, "A")
    s, t = block.f(x), block.g(t0)
    torch.testing.assert_close(out.loss_as, F.mse_loss(block.b(s), t))
    torch.testing.assert_close(out.loss_ae, F.mse_loss(block.h(t), t0))


def test_cross_entropy_first_block_uses_the_labels():
    model = small_mlp(first_ae_loss="cross_entropy")
    x, y = batch()
    block = model.blocks[0]
    out = reference.local_losses(block, x, model.label_targets(y), "A", "cross_entropy")
    torch.testing.assert_close(out.loss_ae, F.cross_entropy(block.h(block.g(model.label_targets(y))), y))


class LossesOf(torch.nn.Module):
    """A block's two local losses as a module, so that functional_call can supply its parameters."""

    def __init__(self, block, variant, mse):
        super().__init__()
        self.block, self.variant, self.mse = block, variant, mse

    def forward(self, s_prev, t_prev):
        out = reference.local_losses(self.block, s_prev, t_prev, self.variant, "mse", self.mse)
        return out.loss_as, out.loss_ae


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("mse", [F.mse_loss, ops.mse_loss], ids=["torch_mse", "al_ext_mse"])
def test_gradcheck_each_loss_for_the_parameters_it_updates(variant, mse):
    # Each loss is checked against finite differences of the parameters it updates, the
    # others held fixed (in variant A, L_as deliberately ignores its target's dependence on g).
    model = small_mlp(hidden=(6,), label_dim=4, bridge_factor=2, variant=variant).double()
    block = model.blocks[0]
    x, y = batch(n=5)
    x, t0 = x.double(), model.label_targets(y)
    losses = LossesOf(block, variant, mse)
    fixed = {f"block.{n}": p.detach() for n, p in block.named_parameters()}
    for which, names in enumerate(reference.updated_parameters(block, variant)):
        def loss(*values, names=names, which=which):
            params = {**fixed, **{f"block.{n}": v for n, v in zip(names, values)}}
            return functional_call(losses, params, (x, t0))[which]

        inputs = tuple(fixed[f"block.{n}"].clone().requires_grad_(True) for n in names)
        assert torch.autograd.gradcheck(loss, inputs)
