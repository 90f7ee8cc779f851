"""al_ext::mse_loss_and_grad against plain PyTorch, on CPU always and on CUDA when present."""
import pytest
import torch
import torch.nn.functional as F

from al_ext import ops

from conftest import DEVICES


def reference(input, target):
    """The same quantities in plain PyTorch: F.mse_loss and its autograd gradient."""
    x = input.detach().clone().requires_grad_(True)
    loss = F.mse_loss(x, target)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


SHAPES = [(1,), (1, 1), (7, 3), (32, 1024), (3, 5, 17), (40000,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_reference(device, shape, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    t = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    loss, grad = ops.mse_loss_and_grad(x, t)
    ref_loss, ref_grad = reference(x, t)
    assert loss.shape == () and loss.dtype == dtype and grad.shape == x.shape
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_the_reference_error(device, dtype):
    # The flash-attention rule: against float64 truth, the kernel's error is at most twice
    # the error of the plain PyTorch computation run in the same low precision.
    gen = torch.Generator().manual_seed(1)
    x64, t64 = torch.rand(64, 300, generator=gen, dtype=torch.float64), torch.rand(64, 300, generator=gen, dtype=torch.float64)
    true_loss, true_grad = reference(x64, t64)
    x, t = x64.to(device, dtype), t64.to(device, dtype)
    loss, grad = ops.mse_loss_and_grad(x, t)
    ref_loss, ref_grad = reference(x, t)
    assert loss.dtype == dtype and grad.dtype == dtype

    def err(a, b):
        return (a.double().cpu() - b).abs().max().item()

    assert err(loss, true_loss) <= 2 * err(ref_loss, true_loss) + 1e-6
    assert err(grad, true_grad) <= 2 * err(ref_grad, true_grad) + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x = torch.randn(50, 40, dtype=torch.float64, device=device).t()
    t = torch.randn(80, 50, dtype=torch.float64, device=device)[::2]
    loss, grad = ops.mse_loss_and_grad(x, t)
    ref_loss, ref_grad = reference(x, t)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_cpu_result_does_not_depend_on_the_thread_count():
    x, t = torch.randn(300_001), torch.randn(300_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.mse_loss_and_grad(x, t)
        torch.set_num_threads(max(2, threads))
        many = ops.mse_loss_and_grad(x, t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        (torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)),
        (torch.randn(5, device=device, requires_grad=True), torch.randn(5, device=device)),
        (torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True),
         torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True)),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.al_ext.mse_loss_and_grad.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_both_outputs_and_both_inputs(device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(ops.mse_loss_and_grad, (x, t))
    assert torch.autograd.gradgradcheck(ops.mse_loss, (x, t))


def test_mse_loss_backward_equals_torch():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    (ops.mse_loss(x, t) * 3).backward()
    gx, gt = x.grad.clone(), t.grad.clone()
    x.grad = t.grad = None
    (F.mse_loss(x, t) * 3).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gt, t.grad)


def test_works_under_torch_compile():
    compiled = torch.compile(ops.mse_loss_and_grad, backend="eager", fullgraph=True)
    x, t = torch.randn(8, 3), torch.randn(8, 3)
    torch.testing.assert_close(compiled(x, t), ops.mse_loss_and_grad(x, t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: (torch.randn(3, 4, device=d), torch.randn(4, 3, device=d)), "target must have the shape of input"),
        (lambda d: (torch.randn(3, device=d), torch.randn(3, dtype=torch.float64, device=d)), "target must have the dtype"),
        (lambda d: (torch.ones(3, dtype=torch.long, device=d), torch.ones(3, dtype=torch.long, device=d)), "input must be float32"),
        (lambda d: (torch.randn(0, 3, device=d), torch.randn(0, 3, device=d)), "must not be empty"),
        (lambda d: (torch.randn(3, device=d), torch.randn(3, device="meta")), "target must be on the device of input"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(device, make, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.mse_loss_and_grad(*make(device))
