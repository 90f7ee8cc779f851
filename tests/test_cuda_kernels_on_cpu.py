"""The CUDA kernels' logic, run on the CPU: csrc/cuda/dense_block.cu compiled unmodified as
C++ over a CUDA runtime of our own (tests/cuda_on_cpu/), each launcher checked in float32,
float64, float16 and bfloat16 against torch computing in float64 on the same inputs.

The runtime runs a block's threads as fibers and makes __syncthreads() a real barrier
(between barriers each thread runs as far as it can, in thread order, then in reverse), so
a missing barrier or a shifted index in a reduction gives wrong sums here. Outputs start
as NaN, so an element a kernel does not write shows, and guard bytes around every buffer
catch a write past its end. Shapes: those of the CUDA tests (batch 1, odd widths), rows
wider than a block, and more elements than one grid covers (the grid is capped at 1024
blocks of 256 threads, so each thread loops).

What this cannot check: cuBLAS (the GEMMs), streams, events and graphs, timing, true
concurrency (warps in lock step, blocks at once, memory ordering between blocks), the
device's own math functions (exp, log and pow here are the host's), FMA contraction, and
delay.cu (inline PTX). tests/test_dense_block.py and tests/test_ops.py check those on a GPU.
"""
from __future__ import annotations

import subprocess

import numpy
import pytest
import torch
import torch.nn.functional as F

from cuda_on_cpu.build import build, find_compiler
from cuda_on_cpu.driver import Kernels

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ACTIVATIONS = ["elu", "relu", "sigmoid", "tanh", "identity"]
BEYOND_ONE_GRID = 1024 * 256 * 4 + 4097  # past the 1024-block cap: every thread strides 5 times


def tolerance(dtype):
    """One rounding to dtype of a result computed in float (double for float64)."""
    return {torch.float32: dict(rtol=2e-5, atol=1e-12), torch.float64: dict(rtol=1e-12, atol=1e-300),
            torch.float16: dict(rtol=torch.finfo(torch.float16).eps, atol=2 ** -24),
            torch.bfloat16: dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-30)}[dtype]


def assert_matches(got, want, dtype, what):
    """Within one rounding to dtype, each element, or of the tensor's largest element where
    the result is a difference of larger values (softmax minus target)."""
    assert got.dtype == dtype, what
    tol = tolerance(dtype)
    atol = max(tol["atol"], tol["rtol"] * float(want.abs().max()))
    torch.testing.assert_close(got.double(), want.double(), rtol=tol["rtol"], atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def compiler() -> str:
    found = find_compiler()
    if found is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) to build the kernels for the CPU")
    return found


@pytest.fixture(scope="module")
def kernels(compiler) -> Kernels:
    return Kernels(build(compiler))


def test_the_runtime_converts_float16_and_bfloat16_as_cuda_does(kernels):
    """Every result in a 16-bit type passes through these, so they must be exact: each bit
    pattern to float as torch reads it, and floats (and doubles, as CUDA's __double2half:
    one rounding, as numpy's) to the nearest, ties to even, at every midpoint and beyond."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for name, dtype in [("half_to_float", torch.float16), ("bfloat16_to_float", torch.bfloat16)]:
        torch.testing.assert_close(kernels.convert(name, bits, torch.float32), bits.view(dtype).float(),
                                   rtol=0, atol=0, equal_nan=True)
    halves = bits.view(torch.float16).double()
    halves = halves[halves.isfinite()].unique()  # sorted
    midpoints = (halves[:-1] + halves[1:]) / 2
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-9, 6, (200_000,), generator=gen)
    doubles = torch.cat([spread, midpoints, midpoints * (1 + 1e-12), midpoints * (1 - 1e-12),
                         torch.tensor([65519.99, 65520.0, 1e6, -0.0, 2.0 ** -25, 2.0 ** -26, float("inf")])])
    floats = doubles.float()
    assert torch.equal(kernels.convert("float_to_half", floats, torch.int16), floats.half().view(torch.int16))
    assert torch.equal(kernels.convert("float_to_bfloat16", floats, torch.int16), floats.bfloat16().view(torch.int16))
    with numpy.errstate(over="ignore"):  # 1e6 and inf become inf, as they should
        single_rounding = torch.from_numpy(doubles.numpy().astype(numpy.float16).view(numpy.int16))
    assert torch.equal(kernels.convert("double_to_half", doubles, torch.int16), single_rounding)


def random(shape, dtype, seed, low=-2.0, high=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


def activation_output(activation, n, dtype, seed):
    """act(z) for random z: what the kernels receive instead of z."""
    z = random((n,), torch.float64, seed, -3, 3)
    act = {"elu": F.elu, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda v: v}
    return act[activation](z).to(dtype)


def torch_activation_backward(grad, y, activation):
    """torch's gradient through an activation, written through its output y (float64)."""
    aten = torch.ops.aten
    return {"elu": lambda: aten.elu_backward(grad, 1.0, 1.0, 1.0, True, y),
            "relu": lambda: aten.threshold_backward(grad, y, 0.0),
            "sigmoid": lambda: aten.sigmoid_backward(grad, y),
            "tanh": lambda: aten.tanh_backward(grad, y),
            "identity": lambda: grad}[activation]()


def mse_reference(out, target, activation):
    o = out.double().requires_grad_(True)
    t = target.double().requires_grad_(True)
    loss = F.mse_loss(o, t)
    grad_o, grad_t = torch.autograd.grad(loss, (o, t))
    return loss.detach(), torch_activation_backward(grad_o, o.detach(), activation), grad_t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n", [1, 7, 300, 40_000])
def test_output_mse_backward(kernels, dtype, activation, n):
    out, target = activation_output(activation, n, dtype, seed=n), random((n,), dtype, seed=n + 1, low=0, high=1)
    loss, dz, dtarget = kernels.output_mse(out, target, activation, with_dtarget=n % 2 == 0)
    want_loss, want_dz, want_dtarget = mse_reference(out, target, activation)
    assert_matches(loss, want_loss, dtype, "loss")
    assert_matches(dz, want_dz, dtype, "dz")
    if dtarget is not None:
        assert_matches(dtarget, want_dtarget, dtype, "dtarget")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_mse_backward_beyond_one_grid(kernels, dtype):
    out = activation_output("sigmoid", BEYOND_ONE_GRID, dtype, seed=3)
    target = random((BEYOND_ONE_GRID,), dtype, seed=4, low=0, high=1)
    loss, dz, dtarget = kernels.output_mse(out, target, "sigmoid", with_dtarget=True)
    for name, got, want in zip(["loss", "dz", "dtarget"], [loss, dz, dtarget], mse_reference(out, target, "sigmoid")):
        assert_matches(got, want, dtype, name)


def target_rows(kind, rows, cols, dtype, seed):
    if kind == "one-hot":
        labels = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(seed))
        return F.one_hot(labels, cols).to(dtype)
    return torch.softmax(random((rows, cols), torch.float64, seed, -2, 2), dim=1).to(dtype)


def check_cross_entropy(kernels, logits, target, dtype):
    """The kernel's loss and dL/dlogits against torch's cross-entropy in float64."""
    loss, dz = kernels.cross_entropy(logits, target)
    x = logits.double().requires_grad_(True)
    want_loss = F.cross_entropy(x, target.double())
    (want_dz,) = torch.autograd.grad(want_loss, x)
    assert_matches(loss, want_loss.detach(), dtype, "loss")
    assert_matches(dz, want_dz, dtype, "dz")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 10), (17, 5), (64, 13), (3, 1000)])
@pytest.mark.parametrize("target_kind", ["one-hot", "soft"])
def test_cross_entropy_backward(kernels, dtype, rows, cols, target_kind):
    logits = random((rows, cols), dtype, seed=rows * cols, low=-4, high=4)
    target = target_rows(target_kind, rows, cols, dtype, seed=cols)
    check_cross_entropy(kernels, logits, target, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_backward_of_rows_far_apart(kernels, dtype):
    """Rows whose maxima lie so far apart that exp overflows or underflows when shifted by
    another row's: the log-sum-exp is otherwise blind to a wrong (stale) row maximum."""
    rows, cols = 4, 300  # wider than half a block, so the max reduction reads every thread
    offset = 1000.0 if dtype == torch.float64 else 120.0
    logits = (random((rows, cols), torch.float64, seed=8) + offset * (torch.arange(rows) % 2).unsqueeze(1)).to(dtype)
    target = target_rows("soft", rows, cols, dtype, seed=9)
    check_cross_entropy(kernels, logits, target, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n,with_addend", [(1, False), (257, True), (40_000, False)])
def test_activation_backward(kernels, dtype, activation, n, with_addend):
    grad, y = random((n,), dtype, seed=n), activation_output(activation, n, dtype, seed=n + 1)
    addend = random((n,), dtype, seed=n + 2) if with_addend else None
    got = kernels.activation_backward(grad, y, activation, addend)
    incoming = grad.double() + (addend.double() if addend is not None else 0)
    assert_matches(got, torch_activation_backward(incoming, y.double(), activation), dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_backward_beyond_one_grid(kernels, dtype):
    grad, y = random((BEYOND_ONE_GRID,), dtype, seed=5), activation_output("elu", BEYOND_ONE_GRID, dtype, seed=6)
    addend = random((BEYOND_ONE_GRID,), dtype, seed=7)
    got = kernels.activation_backward(grad, y, "elu", addend)
    assert_matches(got, torch_activation_backward(grad.double() + addend.double(), y.double(), "elu"), dtype, "grad")


# ---- the multi-tensor update: torch.optim's Adam, AdamW and SGD -------------------------

OPTIMIZERS = {
    "adam": dict(kind="adam"),
    "adam-l2": dict(kind="adam", weight_decay=0.1),
    "adamw": dict(kind="adam", weight_decay=0.1, decoupled=True),
    "sgd": dict(kind="sgd", momentum=0.9),
    "sgd-weight-decay": dict(kind="sgd", momentum=0.9, weight_decay=0.1),
}
LR = (3e-3, 7e-3)  # the two groups'
BETAS, EPS = (0.9, 0.999), 1e-7  # torch's betas, where `1 - beta2` in float32 is furthest off


def torch_optimizer(params, group, kind, lr, weight_decay=0.0, decoupled=False, momentum=0.0):
    """torch.optim's single-tensor implementation, which the kernel's formulas follow."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr[group], momentum=momentum, weight_decay=weight_decay, foreach=False)
    return torch.optim.Adam(params, lr=lr[group], betas=BETAS, eps=EPS, weight_decay=weight_decay,
                            decoupled_weight_decay=decoupled, foreach=False)


def torch_step(kind, param, grad, state1, state2, group, step, dtype=torch.float64, **options):
    """One torch.optim step from the given values and state, in dtype: (param, state1, state2)."""
    p = param.to(dtype).clone().requires_grad_(True)
    p.grad = grad.to(dtype)
    opt = torch_optimizer([p], group, kind, LR, **options)
    if kind == "sgd":
        if step > 1:  # torch's first step starts the buffer at the gradient
            opt.state[p] = {"momentum_buffer": state1.to(dtype).clone()}
    else:
        opt.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": state1.to(dtype).clone(),
                        "exp_avg_sq": state2.to(dtype).clone()}
    opt.step()
    if kind == "sgd":
        return p.detach(), opt.state[p]["momentum_buffer"], None
    return p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


def update_tensors(sizes, dtype, seed):
    params = [random((n,), dtype, seed + i) for i, n in enumerate(sizes)]
    grads = [random((n,), dtype, seed + 100 + i, -0.1, 0.1) for i, n in enumerate(sizes)]
    state1 = [random((n,), dtype, seed + 200 + i, -0.01, 0.01) for i, n in enumerate(sizes)]
    state2 = [random((n,), dtype, seed + 300 + i, 0, 1e-4) for i, n in enumerate(sizes)]
    return params, grads, state1, state2


def run_update(kernels, params, grads, state1, state2, step=3, **options):
    options = dict(options)
    kind = options.pop("kind")
    groups = [i % 2 for i in range(len(params))]
    kernels.update(kind, params, grads, state1, state2 if kind == "adam" else None, groups=groups, lr=LR,
                   betas=BETAS, eps=EPS, step=step, **options)
    return groups


def assert_update_matches_torch(kernels, dtype, sizes, optimizer, step=3):
    """One launch over tensors of several sizes in both groups against torch.optim in float64
    started from the same values and state (so the kernel may differ by one rounding)."""
    options = OPTIMIZERS[optimizer]
    params, grads, state1, state2 = update_tensors(sizes, dtype, seed=len(sizes))
    before = [[t.clone() for t in ts] for ts in (params, state1, state2)]
    groups = run_update(kernels, params, grads, state1, state2, step=step, **options)
    torch_options = {k: v for k, v in options.items() if k != "kind"}
    for i, group in enumerate(groups):
        want = torch_step(options["kind"], before[0][i], grads[i], before[1][i], before[2][i], group, step,
                          **torch_options)
        got = (params[i], state1[i], state2[i])
        for name, a, b in zip(["param", "state1", "state2"], got, want):
            if b is not None:
                assert_matches(a, b, dtype, f"tensor {i} (group {group}) {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_multi_tensor_update_equals_torch_optim(kernels, dtype, optimizer):
    assert_update_matches_torch(kernels, dtype, [1, 7, 1025, 40_000, 3, 10], optimizer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_tensor_update_beyond_one_grid(kernels, dtype):
    """A row of blocks sized by the largest tensor: the small one's extra blocks do nothing."""
    assert_update_matches_torch(kernels, dtype, [BEYOND_ONE_GRID, 5], "adamw", step=1)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_update_follows_torch_optim_step_by_step_in_its_own_dtype(kernels, dtype, optimizer):
    """Five steps against torch.optim running in the same dtype: the coefficients must be
    formed as torch forms them (`1 - beta2` formed in float32 is off by 1.3e-5 relative)."""
    options = OPTIMIZERS[optimizer]
    kind = options["kind"]
    torch_options = {k: v for k, v in options.items() if k != "kind"}
    params, grads, state1, state2 = update_tensors([513, 64], dtype, seed=11)
    state1 = [torch.zeros_like(p) for p in params]
    state2 = [torch.zeros_like(p) for p in params]
    theirs = [p.clone().requires_grad_(True) for p in params]
    optimizers = [torch_optimizer([p], i % 2, kind, LR, **torch_options) for i, p in enumerate(theirs)]
    for step in range(1, 6):
        grads = [random(p.shape, dtype, seed=step * 10 + i, low=-0.1, high=0.1) for i, p in enumerate(params)]
        run_update(kernels, params, grads, state1, state2, step=step, **options)
        for p, g, opt in zip(theirs, grads, optimizers):
            p.grad = g.clone()
            opt.step()
        # A few roundings apart (torch's CPU loops fuse some multiply-adds), relative to each
        # tensor's largest element where a moment is a difference of larger values.
        rtol = 4e-7 if dtype == torch.float32 else 1e-14
        for i, (mine, p, opt) in enumerate(zip(params, theirs, optimizers)):
            state = opt.state[p]
            pairs = [("param", mine, p.detach())]
            pairs += [("exp_avg", state1[i], state["exp_avg"]), ("exp_avg_sq", state2[i], state["exp_avg_sq"])] \
                if kind == "adam" else [("momentum_buffer", state1[i], state["momentum_buffer"])]
            for name, a, b in pairs:
                torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()),
                                           msg=lambda m: f"step {step} tensor {i} {name}: {m}")


@pytest.mark.parametrize("count_dtype", [torch.float32, torch.float64], ids=str)
def test_adam_reads_and_counts_its_step_on_the_device(kernels, count_dtype):
    """With step_count, the step number is the count plus one, as if passed from the host,
    and the count goes up by one."""
    host = update_tensors([300, 17], torch.float32, seed=5)
    device = [[t.clone() for t in ts] for ts in host]
    count = torch.tensor(6.0, dtype=count_dtype)
    run_update(kernels, *host, step=7, kind="adam")
    groups = [i % 2 for i in range(2)]
    kernels.update("adam", device[0], device[1], device[2], device[3], groups=groups, lr=LR, betas=BETAS, eps=EPS,
                   step=1, step_count=count)
    assert float(count) == 7.0
    for a, b in zip(host[0] + host[2] + host[3], device[0] + device[2] + device[3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", ["nan-as", "inf-ae"])
def test_a_non_finite_loss_changes_nothing_and_is_not_counted(kernels, dtype, bad):
    params, grads, state1, state2 = update_tensors([300, 17], dtype, seed=9)
    before = [t.clone() for t in params + state1 + state2]
    losses = [torch.tensor(0.5, dtype=dtype), torch.tensor(0.25, dtype=dtype)]
    losses[0 if bad == "nan-as" else 1].fill_(float("nan") if bad == "nan-as" else float("inf"))
    count = torch.tensor(2.0)
    kernels.update("adam", params, grads, state1, state2, groups=[0, 1], step_count=count, losses=losses)
    assert float(count) == 2.0
    assert all(torch.equal(a, b) for a, b in zip(before, params + state1 + state2))
    losses[0].fill_(0.5), losses[1].fill_(0.25)
    kernels.update("adam", params, grads, state1, state2, groups=[0, 1], step_count=count, losses=losses)
    assert float(count) == 3.0 and not torch.equal(before[0], params[0])


# ---- compute_dtype=bfloat16: bf16 activations, float32 losses, master weights and state ----

@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
@pytest.mark.parametrize("n", [7, 40_000, BEYOND_ONE_GRID])
def test_output_mse_backward_writes_a_float32_loss_over_bfloat16_activations(kernels, activation, n):
    """The loss of bf16 compute: computed as the bf16 kernel computes it, but not rounded to
    bfloat16 at the end (whose eps, 2^-8, the float32 tolerance below would catch)."""
    out = activation_output(activation, n, torch.bfloat16, seed=n)
    target = random((n,), torch.bfloat16, seed=n + 1, low=0, high=1)
    loss, dz, dtarget = kernels.output_mse(out, target, activation, with_dtarget=True, float32_loss=True)
    bf16_loss, bf16_dz, bf16_dtarget = kernels.output_mse(out, target, activation, with_dtarget=True)
    want_loss, want_dz, _ = mse_reference(out, target, activation)
    assert_matches(loss, want_loss, torch.float32, "loss")
    assert torch.equal(loss.bfloat16(), bf16_loss), "the same sum, rounded once more"
    assert torch.equal(dz, bf16_dz) and torch.equal(dtarget, bf16_dtarget), "only the loss's dtype changes"
    assert_matches(dz, want_dz, torch.bfloat16, "dz")


@pytest.mark.parametrize("rows,cols", [(1, 10), (64, 13), (3, 1000)])
def test_cross_entropy_backward_writes_a_float32_loss_over_bfloat16_logits(kernels, rows, cols):
    logits = random((rows, cols), torch.bfloat16, seed=rows * cols, low=-4, high=4)
    target = target_rows("one-hot", rows, cols, torch.bfloat16, seed=cols)
    loss, dz = kernels.cross_entropy(logits, target, float32_loss=True)
    bf16_loss, bf16_dz = kernels.cross_entropy(logits, target)
    x = logits.double().requires_grad_(True)
    want_loss = F.cross_entropy(x, target.double())
    assert_matches(loss, want_loss.detach(), torch.float32, "loss")
    assert torch.equal(loss.bfloat16(), bf16_loss) and torch.equal(dz, bf16_dz)


def bfloat16_copies_out_of_date(params):
    """Copies that the update must overwrite: each the parameter's rounding plus one bf16 ulp."""
    return [(p.bfloat16().view(torch.int16) + 1).view(torch.bfloat16) for p in params]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_update_of_float32_master_weights_rewrites_their_bfloat16_copies(kernels, optimizer):
    """compute_dtype=bfloat16's update: float32 parameters, gradients and state (in bfloat16,
    0.999 v rounds back to v, so Adam's second moment would never decay), followed step by step
    against torch.optim in float32; each step leaves the bfloat16 copies equal to the updated
    parameters rounded, as param.to(torch.bfloat16) rounds them."""
    options = OPTIMIZERS[optimizer]
    kind = options["kind"]
    torch_options = {k: v for k, v in options.items() if k != "kind"}
    params, _, _, _ = update_tensors([1, 7, 1025, 3000], torch.float32, seed=13)
    state1 = [torch.zeros_like(p) for p in params]
    state2 = [torch.zeros_like(p) for p in params]
    copies = bfloat16_copies_out_of_date(params)
    theirs = [p.clone().requires_grad_(True) for p in params]
    optimizers = [torch_optimizer([p], i % 2, kind, LR, **torch_options) for i, p in enumerate(theirs)]
    for step in range(1, 6):
        grads = [random(p.shape, torch.float32, seed=step * 10 + i, low=-0.1, high=0.1) for i, p in enumerate(params)]
        run_update(kernels, params, grads, state1, state2, step=step, compute_copies=copies, **options)
        for p, g, opt in zip(theirs, grads, optimizers):
            p.grad = g.clone()
            opt.step()
        for i, (mine, p, opt) in enumerate(zip(params, theirs, optimizers)):
            assert torch.equal(copies[i], mine.bfloat16()), f"step {step} tensor {i}: the copy is not the parameter rounded"
            state = opt.state[p]
            pairs = [("param", mine, p.detach())]
            pairs += [("exp_avg", state1[i], state["exp_avg"]), ("exp_avg_sq", state2[i], state["exp_avg_sq"])] \
                if kind == "adam" else [("momentum_buffer", state1[i], state["momentum_buffer"])]
            for name, a, b in pairs:
                assert a.dtype == torch.float32
                torch.testing.assert_close(a, b, rtol=4e-7, atol=4e-7 * float(b.abs().max()),
                                           msg=lambda m: f"step {step} tensor {i} {name}: {m}")


def test_update_rewrites_every_copy_beyond_one_grid(kernels):
    params, grads, state1, state2 = update_tensors([BEYOND_ONE_GRID, 5], torch.float32, seed=17)
    copies = bfloat16_copies_out_of_date(params)
    run_update(kernels, params, grads, state1, state2, step=1, compute_copies=copies, kind="adam", weight_decay=0.1,
               decoupled=True)
    assert all(torch.equal(c, p.bfloat16()) for c, p in zip(copies, params))


def test_a_refused_step_leaves_the_bfloat16_copies_as_they_were(kernels):
    params, grads, state1, state2 = update_tensors([300, 17], torch.float32, seed=19)
    copies = bfloat16_copies_out_of_date(params)
    before = [t.clone() for t in params + state1 + state2 + copies]
    losses = [torch.tensor(float("nan")), torch.tensor(0.25)]
    kernels.update("adam", params, grads, state1, state2, groups=[0, 1], losses=losses, compute_copies=copies)
    assert all(torch.equal(a, b) for a, b in zip(before, params + state1 + state2 + copies))


def test_the_sanitizer_program_runs_every_launcher(compiler):
    """scripts/gpu_check.sh runs this program under compute-sanitizer on a GPU; here it runs
    on the CPU runtime, so that it is known to build and to launch cleanly before then."""
    result = subprocess.run([str(build(compiler, program=True)), "5000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr
