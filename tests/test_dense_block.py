"""al_ext::dense_block_step and dense_block_adam_step_ against al_ext.reference."""
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import al_ext
from al_ext import fused, reference

from conftest import CUDA_REASON, DEVICES, HAS_CUDA, small_mlp

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)


def make_block(n, dx, h, b, d, dy, dtype=torch.float64, device="cpu", seed=0):
    """Random block parameters (W_f, c_f, W_b1, c_b1, W_b2, c_b2, W_g, c_g, W_h, c_h) and inputs."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(h, dx), (h,), (b, h), (b,), (d, b), (d,), (d, dy), (d,), (dy, d), (dy,)]
    params = [(torch.randn(s, generator=gen, dtype=torch.float64) / (s[-1] ** 0.5)).to(device, dtype) for s in shapes]
    s_prev = torch.randn(n, dx, generator=gen, dtype=torch.float64).to(device, dtype)
    labels = torch.randint(0, dy, (n,), generator=gen)
    t_prev = torch.nn.functional.one_hot(labels, dy).to(device, dtype)
    return s_prev, t_prev, params


def assert_matches_reference(s_prev, t_prev, params, tol, **config):
    got = fused.dense_block_step(s_prev, t_prev, params, **config)
    want = reference.dense_block_step(s_prev, t_prev, params, **config)
    for name, a, b in [("s", got.s, want.s), ("t", got.t, want.t), ("loss_as", got.loss_as, want.loss_as),
                       ("loss_ae", got.loss_ae, want.loss_ae)] + [
                          (n, a, b) for n, a, b in zip(reference.DENSE_PARAMETER_NAMES, got.grads, want.grads)]:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2, msg=lambda m: f"{name}: {m}")


SHAPES = [(1, 3, 5, 7, 4, 2), (17, 20, 33, 65, 9, 5), (64, 50, 31, 100, 13, 13), (5, 784, 64, 320, 64, 10)]
CONFIGS = [
    dict(variant="A"),
    dict(variant="B"),
    dict(variant="A", x_activation="relu"),
    dict(variant="B", x_activation="tanh"),
    dict(variant="A", x_activation="sigmoid", h_activation="identity", ae_loss="cross_entropy"),
    dict(variant="B", h_activation="identity", ae_loss="cross_entropy"),
    dict(variant="A", h_activation="identity"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_float64_matches_reference(device, shape, config):
    assert_matches_reference(*make_block(*shape, device=device), tol=1e-10, **config)


# float32 on the CPU takes its GEMMs from oneDNN, with ReLU, sigmoid and tanh fused into
# them; float64 takes ATen's. So float32 gets every shape and every configuration too.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_float32_matches_reference(device, shape, config):
    assert_matches_reference(*make_block(*shape, dtype=torch.float32, device=device), tol=2e-4, **config)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40), dx=st.integers(1, 40), h=st.integers(1, 40), b=st.integers(1, 80), d=st.integers(1, 20),
    dy=st.integers(2, 12), config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**16),
)
def test_property_any_shape_matches_reference(n, dx, h, b, d, dy, config, seed):
    assert_matches_reference(*make_block(n, dx, h, b, d, dy, seed=seed), tol=1e-9, **config)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40), dx=st.integers(1, 40), h=st.integers(1, 40), b=st.integers(1, 80), d=st.integers(1, 20),
    dy=st.integers(2, 12), config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**16),
)
def test_property_any_shape_matches_reference_in_float32(n, dx, h, b, d, dy, config, seed):
    assert_matches_reference(*make_block(n, dx, h, b, d, dy, dtype=torch.float32, seed=seed), tol=2e-4, **config)


def test_non_contiguous_inputs():
    s_prev, t_prev, params = make_block(9, 12, 8, 16, 6, 4)
    wide_s = torch.randn(12, 18, dtype=torch.float64)
    s_view = wide_s[:, ::2].t()  # (9, 12), neither row- nor column-contiguous
    t_view = t_prev.t().contiguous().t()  # column-major
    assert not s_view.is_contiguous() and not t_view.is_contiguous()
    assert_matches_reference(s_view, t_view, params, tol=1e-10)


def test_results_repeat_bit_for_bit():
    s_prev, t_prev, params = make_block(33, 40, 64, 300, 32, 10, dtype=torch.float32)
    first, second = (fused.dense_block_step(s_prev, t_prev, params, variant="B") for _ in range(2))
    for a, b in zip([first.s, first.t, first.loss_as, *first.grads], [second.s, second.t, second.loss_as, *second.grads]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    s_prev, t_prev, params = make_block(6, 5, 7, 9, 4, 3, dtype=torch.float32, device=device)
    args = (s_prev, t_prev, params, "elu", "sigmoid", "B", "mse")
    torch.library.opcheck(torch.ops.al_ext.dense_block_step.default, args)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    adam_args = (s_prev, t_prev, params, *state, 1.0, 1e-3, 2e-3, 0.9, 0.999, 1e-8, "elu", "sigmoid", "A", "mse")
    torch.library.opcheck(torch.ops.al_ext.dense_block_adam_step_.default, adam_args)
    sgd_args = (s_prev, t_prev, params, state[0], 1e-3, 2e-3, 0.9, "elu", "sigmoid", "B", "mse")
    torch.library.opcheck(torch.ops.al_ext.dense_block_sgd_step_.default, sgd_args)
    step = torch.zeros((), dtype=torch.float64, device=device)
    counted_args = (s_prev, t_prev, params, *state, step, 1e-3, 2e-3, 0.9, 0.999, 1e-8, "elu", "sigmoid", "A", "mse")
    torch.library.opcheck(torch.ops.al_ext.dense_block_adam_step_.step_tensor, counted_args)


# After four steps: float64 agrees to rounding; in float32 the gradients come from other GEMM
# libraries than the reference's (oneDNN and MKL tiles on the CPU), and Adam divides by
# their size, so parameters differ by up to a few 1e-6 (with a learning rate of 3e-3).
UPDATE_TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=2e-5)}


def assert_update_form_matches_torch(fused_update, torch_optimizers, device="cpu", shape=(8, 10, 12, 24, 6, 4),
                                     dtype=torch.float64, **config):
    """Four steps of a fused update form against torch optimisers fed the reference gradients.

    fused_update(s_prev, t_prev, params, step) updates params in place; torch_optimizers
    (fb_params, gh_params) gives the two torch optimisers it should equal.
    """
    _, _, params = make_block(*shape, dtype=dtype, device=device)
    ours = [p.clone() for p in params]
    theirs = [p.clone().requires_grad_(True) for p in params]
    optimizers = torch_optimizers(theirs[:6], theirs[6:])
    for step in range(1, 5):
        s_prev, t_prev, _ = make_block(*shape, dtype=dtype, device=device, seed=step)
        out = fused_update(s_prev, t_prev, ours, step)
        want = reference.dense_block_step(s_prev, t_prev, theirs, **config)
        torch.testing.assert_close(out[2], want.loss_as)
        torch.testing.assert_close(out[3], want.loss_ae)
        for p, g in zip(theirs, want.grads):
            p.grad = g
        for opt in optimizers:
            opt.step()
        for name, a, b in zip(reference.DENSE_PARAMETER_NAMES, ours, theirs):
            torch.testing.assert_close(a, b.detach(), **UPDATE_TOLERANCES[dtype],
                                       msg=lambda m: f"step {step} {name}: {m}")


def zeros_like_block(device="cpu", dtype=torch.float64):
    return [torch.zeros_like(p) for p in make_block(8, 10, 12, 24, 6, 4, dtype=dtype, device=device)[2]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("ae_loss", ["mse", "cross_entropy"])
def test_adam_form_equals_torch_adam_on_reference_gradients(device, dtype, variant, ae_loss):
    config = dict(variant=variant, ae_loss=ae_loss, h_activation="identity" if ae_loss == "cross_entropy" else "sigmoid")
    exp_avg, exp_avg_sq = zeros_like_block(device, dtype), zeros_like_block(device, dtype)
    assert_update_form_matches_torch(
        lambda s, t, params, step: fused.dense_block_adam_step_(s, t, params, exp_avg, exp_avg_sq, step, 3e-3, 7e-3,
                                                                betas=(0.8, 0.99), eps=1e-7, **config),
        lambda fb, gh: [torch.optim.Adam(fb, lr=3e-3, betas=(0.8, 0.99), eps=1e-7),
                        torch.optim.Adam(gh, lr=7e-3, betas=(0.8, 0.99), eps=1e-7)],
        device,
        dtype=dtype,
        **config,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count_dtype", [torch.float32, torch.float64], ids=str)
def test_adam_step_tensor_form_equals_the_step_number_form(device, count_dtype):
    """The step number read from a tensor (on CUDA, on the device) and counted there: the
    same updates as the host's step numbers, bit for bit on the CPU (on CUDA the device's pow
    may round the bias corrections differently in the last place)."""
    _, _, params = make_block(8, 10, 12, 24, 6, 4, dtype=torch.float32, device=device)
    counted = [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    count = torch.tensor(0.0, dtype=count_dtype, device=device)
    for step in range(1, 5):
        s_prev, t_prev, _ = make_block(8, 10, 12, 24, 6, 4, dtype=torch.float32, device=device, seed=step)
        want = fused.dense_block_adam_step_(s_prev, t_prev, params, state[0], state[1], step, 3e-3, 7e-3)
        got = fused.dense_block_adam_step_(s_prev, t_prev, counted, state[2], state[3], count, 3e-3, 7e-3)
        assert float(count) == step
        for a, b in zip([*got, *counted, *state[2], *state[3]], [*want, *params, *state[0], *state[1]]):
            if device == "cpu":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_tensor_form_does_not_count_a_refused_step(device):
    s_prev, t_prev, params = make_block(4, 6, 5, 7, 3, 2, dtype=torch.float32, device=device)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    count = torch.tensor(3.0, device=device)
    s_prev[1, 1] = float("nan")
    _, _, loss_as, _ = fused.dense_block_adam_step_(s_prev, t_prev, params, *state, count, 1e-3, 2e-3)
    assert not torch.isfinite(loss_as), "refused without raising, on every device: the losses say why"
    assert float(count) == 3.0


def test_adam_step_tensor_form_refuses_a_bad_counter():
    s_prev, t_prev, params = make_block(4, 6, 5, 7, 3, 2)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    with pytest.raises(RuntimeError, match="step must be a one-element tensor"):
        fused.dense_block_adam_step_(s_prev, t_prev, params, *state, torch.zeros(2, dtype=torch.float64), 1e-3, 2e-3)
    with pytest.raises(RuntimeError, match="step must be float32 or float64, got Long"):
        fused.dense_block_adam_step_(s_prev, t_prev, params, *state, torch.tensor(0), 1e-3, 2e-3)
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="step must be on the parameters' device cpu"):
            fused.dense_block_adam_step_(s_prev, t_prev, params, *state, torch.tensor(0.0, device="cuda"), 1e-3, 2e-3)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_update_forms_replay_from_a_cuda_graph_as_they_run_eagerly(optimizer):
    """Nothing in a captured update step depends on the host: replaying the graph three times
    equals three eager steps (Adam counting its steps on the device)."""
    shape = (16, 10, 12, 24, 6, 4)
    _, _, params = make_block(*shape, dtype=torch.float32, device="cuda")
    graphed = [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    counts = [torch.zeros((), device="cuda") for _ in range(2)]

    def step(params, state, count, s_prev, t_prev):
        if optimizer == "adam":
            return fused.dense_block_adam_step_(s_prev, t_prev, params, *state, count, 3e-3, 7e-3)
        return fused.dense_block_sgd_step_(s_prev, t_prev, params, state[0], 3e-3, 7e-3, 0.9)

    batches = [make_block(*shape, dtype=torch.float32, device="cuda", seed=seed)[:2] for seed in range(1, 5)]
    step(params, state[:2], counts[0], *batches[0])  # warm-up, on both copies
    step(graphed, state[2:], counts[1], *batches[0])
    static_s, static_t = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        out = step(graphed, state[2:], counts[1], static_s, static_t)
    for s_prev, t_prev in batches[1:]:
        want = step(params, state[:2], counts[0], s_prev, t_prev)
        static_s.copy_(s_prev)
        static_t.copy_(t_prev)
        graph.replay()
        for a, b in zip([*out, *graphed, *state[2][0:1]], [*want, *params, *state[0][0:1]]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(counts[1]) == float(counts[0]) == (4 if optimizer == "adam" else 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [40, 64])
def test_adam_form_updates_weights_larger_than_one_tile(batch, dtype):
    """The CPU update form computes weight gradients in tiles of rows, which grow with the
    batch; here W_b1 (500 x 300) takes three tiles at batch 40 and two at batch 64, the last
    one partial."""
    shape = (batch, 30, 300, 500, 20, 6)
    state = [[torch.zeros_like(p) for p in make_block(*shape, dtype=dtype)[2]] for _ in range(2)]
    assert_update_form_matches_torch(
        lambda s, t, params, step: fused.dense_block_adam_step_(s, t, params, *state, step, 3e-3, 7e-3),
        lambda fb, gh: [torch.optim.Adam(fb, lr=3e-3), torch.optim.Adam(gh, lr=7e-3)],
        shape=shape,
        dtype=dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["A", "B"])
def test_sgd_form_equals_torch_sgd_with_momentum_on_reference_gradients(device, dtype, variant):
    buffers = zeros_like_block(device, dtype)
    assert_update_form_matches_torch(
        lambda s, t, params, step: fused.dense_block_sgd_step_(s, t, params, buffers, 0.05, 0.2, 0.8, variant=variant),
        lambda fb, gh: [torch.optim.SGD(fb, lr=0.05, momentum=0.8), torch.optim.SGD(gh, lr=0.2, momentum=0.8)],
        device,
        dtype=dtype,
        variant=variant,
    )


def test_bad_sgd_arguments():
    s_prev, t_prev, params = make_block(8, 10, 12, 24, 6, 4)
    buffers = zeros_like_block()
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        fused.dense_block_sgd_step_(s_prev, t_prev, params, buffers, 0.05, 0.2, 1.5)
    with pytest.raises(RuntimeError, match="momentum_buffer must hold one tensor per parameter"):
        fused.dense_block_sgd_step_(s_prev, t_prev, params, buffers[:4], 0.05, 0.2)


def test_alml_blocks_expose_their_dense_layout():
    model = small_mlp(first_ae_loss="cross_entropy")
    params, x_act, h_act = fused.dense_block_layout(model.blocks[0])
    assert (x_act, h_act) == ("elu", "identity") and params[0] is model.blocks[0].f[1].weight
    assert fused.dense_block_layout(model.blocks[1])[2] == "sigmoid"
    conv = al_ext.ALBlock(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="f must be Sequential"):
        fused.dense_block_layout(conv)
    model.blocks[1].f[1] = torch.nn.GELU()
    with pytest.raises(ValueError, match="f's activation must be one of"):
        fused.dense_block_layout(model.blocks[1])


def test_backend_choice():
    assert small_mlp().uses_fused_step() and not small_mlp(backend="reference").uses_fused_step()
    model = small_mlp(backend="fused").half()
    with pytest.raises(ValueError, match="backend='fused' cannot train this model: .*takes torch.float32, torch.float64"):
        model.uses_fused_step()
    assert not small_mlp().half().uses_fused_step(), "auto falls back where the fused op does not fit"


def test_fused_and_reference_training_agree_in_float64():
    fused_model, ref_model = small_mlp().double(), small_mlp(backend="reference").double()
    x = torch.randn(64, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (64,))
    histories = []
    for model in (fused_model, ref_model):
        trainer = al_ext.Trainer(model, lr=1e-2, batch_size=16, progress=False)
        assert isinstance(trainer.engine, al_ext.engines.FusedALEngine) == (model is fused_model)
        histories.append(trainer.fit((x, y), epochs=3))
    for a, b in zip(fused_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for ra, rb in zip(*histories):
        assert ra["loss_as"] == pytest.approx(rb["loss_as"], rel=1e-9)


def test_op_releases_the_gil():
    s_prev, t_prev, params = make_block(256, 1024, 1024, 4096, 1024, 10, dtype=torch.float32)
    fused.dense_block_step(s_prev, t_prev, params)
    start = time.perf_counter()
    fused.dense_block_step(s_prev, t_prev, params)
    one_call = time.perf_counter() - start
    ticks = []
    worker = threading.Thread(target=lambda: [fused.dense_block_step(s_prev, t_prev, params) for _ in range(3)])
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # With the GIL held for a whole call, this thread would stall for about one call's time.
    assert one_call > 0.04, "calls must be long enough for a held GIL to show"
    assert max(gaps, default=0) < 0.5 * one_call, (max(gaps), one_call)


BAD = [
    (lambda s, t, p: (s, t, p[:9]), "params must hold the 10 tensors"),
    (lambda s, t, p: (s, t[:-1], p), "t_prev must be 2-D with s_prev's"),
    (lambda s, t, p: (s[:, :-1], t, p), r"W_f must have shape .* d_x = s_prev's width"),
    (lambda s, t, p: (s, t, p[:2] + [p[2][:, :-1].contiguous()] + p[3:]), "W_b1 must have shape"),
    (lambda s, t, p: (s, t, p[:9] + [p[9][:-1]]), "c_h must have shape"),
    (lambda s, t, p: (s, t, p[:4] + [p[4].float()] + p[5:]), r"params\[4\] \(W_b2\) must have s_prev's dtype"),
    (lambda s, t, p: (s, t.float(), p), "t_prev must have s_prev's dtype"),
    (lambda s, t, p: (s, t, p[:2] + [p[2].t().contiguous().t()] + p[3:]), r"params\[2\] \(W_b1\) must be contiguous"),
    (lambda s, t, p: (s, t, p[:1] + [p[1].to("meta")] + p[2:]), "c_f must be on s_prev.s device"),
    (lambda s, t, p: (s.clone().index_fill_(0, torch.tensor([1]), float("nan")), t, p), "non-finite loss"),
]


@pytest.mark.parametrize("mangle,message", BAD)
def test_bad_input_is_refused_from_cpp(mangle, message):
    args = mangle(*make_block(4, 6, 5, 7, 3, 2))
    with pytest.raises(RuntimeError, match=message):
        fused.dense_block_step(*args)


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(variant="C"), "variant must be 'A' or 'B'"),
        (dict(x_activation="gelu"), "x_activation must be"),
        (dict(ae_loss="cross_entropy"), "needs h_activation='identity'"),
        (dict(ae_loss="l1"), "ae_loss must be"),
    ],
)
def test_bad_configuration(config, message):
    with pytest.raises(RuntimeError, match=message):
        fused.dense_block_step(*make_block(4, 6, 5, 7, 3, 2), **config)


def test_refused_adam_step_changes_nothing():
    s_prev, t_prev, params = make_block(4, 6, 5, 7, 3, 2)
    before = [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    s_prev[2, 3] = float("inf")
    _, _, loss_as, loss_ae = fused.dense_block_adam_step_(s_prev, t_prev, params, *state, 1, 1e-3, 2e-3)
    _, _, sgd_loss_as, _ = fused.dense_block_sgd_step_(s_prev, t_prev, params, state[0], 1e-3, 2e-3)
    assert not torch.isfinite(loss_as) and torch.isfinite(loss_ae) and not torch.isfinite(sgd_loss_as)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(s.abs().sum() == 0 for s in state[0] + state[1])
    with pytest.raises(ValueError, match="step must be the step number"):
        fused.dense_block_adam_step_(s_prev, t_prev, params, *state, 0, 1e-3, 2e-3)
    with pytest.raises(ValueError, match="lr_gh must be a finite number >= 0, got -0.002"):
        fused.dense_block_adam_step_(s_prev, t_prev, params, *state, 1, 1e-3, -2e-3)
    with pytest.raises(RuntimeError, match=r"exp_avg\[3\] must be a contiguous tensor like params\[3\]"):
        fused.dense_block_adam_step_(s_prev, t_prev, params, state[0][:3] + [state[0][4]] + state[0][4:], state[1],
                                     1, 1e-3, 2e-3)


@needs_cuda
def test_cuda_update_forms_refuse_a_non_finite_step_on_the_device():
    s_prev, t_prev, params = make_block(4, 6, 5, 7, 3, 2, dtype=torch.float32, device="cuda")
    before = [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    s_prev[2, 3] = float("inf")
    # No exception: the op does not wait for the device; its losses say what happened.
    _, _, loss_as, _ = fused.dense_block_adam_step_(s_prev, t_prev, params, *state, 1, 1e-3, 2e-3)
    _, _, sgd_loss_as, _ = fused.dense_block_sgd_step_(s_prev, t_prev, params, state[0], 1e-3, 2e-3)
    assert not torch.isfinite(loss_as) and not torch.isfinite(sgd_loss_as)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(s.abs().sum() == 0 for s in state[0] + state[1])


@needs_cuda
def test_fused_optimiser_on_cuda_raises_for_a_refused_step():
    model = small_mlp(backend="fused").cuda()
    opt = fused.FusedBlockAdam(model.blocks[0], 1e-3, 2e-3)
    x = torch.randn(4, 20, device="cuda")
    x[1, 2] = float("nan")
    before = [p.detach().clone() for p in model.blocks[0].parameters()]
    with pytest.raises(al_ext.NonFiniteLossError, match="non-finite loss L_as = nan; that step was refused"):
        opt.train_step(x, model.label_targets(torch.tensor([0, 1, 2, 3])))
    assert all(torch.equal(a, b) for a, b in zip(before, model.blocks[0].parameters()))
    assert all(float(opt.state[p]["step"]) == 0 for p in model.blocks[0].parameters())


@needs_cuda
def test_cuda_step_repeats_bit_for_bit():
    """Deterministic without a switch: fixed-order reductions and no atomics in our kernels,
    cuBLAS (deterministic on one stream) for the GEMMs, ATen's sum for the bias gradients."""
    args = make_block(64, 50, 31, 100, 13, 13, dtype=torch.float32, device="cuda")
    first, second = (fused.dense_block_step(*args, variant="B") for _ in range(2))
    for a, b in zip([first.s, first.t, first.loss_as, first.loss_ae, *first.grads],
                    [second.s, second.t, second.loss_as, second.loss_ae, *second.grads]):
        assert torch.equal(a, b)


def max_error(a, b):
    return float((a.double() - b.double()).abs().max())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[4]], ids=["A", "B", "A-cross-entropy"])
def test_low_precision_on_cuda_within_twice_the_reference_error(dtype, config):
    """The flash-attention rule: against the float64 truth, the kernel's error is at most twice
    that of the plain PyTorch reference run in the same low precision."""
    s64, t64, p64 = make_block(64, 50, 31, 100, 13, 13, device="cuda")
    truth = reference.dense_block_step(s64, t64, p64, **config)
    low = (s64.to(dtype), t64.to(dtype), [p.to(dtype) for p in p64])
    got = fused.dense_block_step(*low, **config)
    ref = reference.dense_block_step(*low, **config)
    outputs = [("s", got.s, ref.s, truth.s), ("t", got.t, ref.t, truth.t), ("loss_as", got.loss_as, ref.loss_as, truth.loss_as),
               ("loss_ae", got.loss_ae, ref.loss_ae, truth.loss_ae)]
    outputs += list(zip(reference.DENSE_PARAMETER_NAMES, got.grads, ref.grads, truth.grads))
    for name, ours, theirs, exact in outputs:
        assert ours.dtype == dtype
        slack = 1e-3 * float(exact.abs().max())  # where the reference happens to be almost exact
        assert max_error(ours, exact) <= 2 * max_error(theirs, exact) + slack, name


def test_trainer_reports_a_non_finite_fused_step_with_its_block():
    model = small_mlp()
    trainer = al_ext.Trainer(model, progress=False)
    with torch.no_grad():
        model.blocks[1].b[0].weight[0, 0] = float("nan")
    with pytest.raises(al_ext.NonFiniteLossError, match="non-finite loss L_as = nan in block 2.*blocks 1-1 were updated") as err:
        trainer.step(torch.randn(4, 20), torch.tensor([0, 1, 2, 3]))
    assert (err.value.block, err.value.loss) == (2, "L_as") and isinstance(err.value, FloatingPointError)


@needs_cuda
def test_trainer_on_cuda_reports_a_non_finite_fused_step_with_its_block():
    model = small_mlp(backend="fused")
    trainer = al_ext.Trainer(model, progress=False, device="cuda")
    with torch.no_grad():
        model.blocks[1].b[0].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.blocks[1].parameters()]
    with pytest.raises(al_ext.NonFiniteLossError, match="non-finite loss .* in block 2.*blocks 1-1 were updated"):
        trainer.step(torch.randn(4, 20), torch.tensor([0, 1, 2, 3]))
    for a, b in zip(before, model.blocks[1].parameters()):
        assert torch.equal(a.nan_to_num(), b.detach().nan_to_num())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_trainer_fused_and_reference_agree_for_each_optimizer(optimizer):
    x = torch.randn(48, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (48,))
    models = [small_mlp(backend=b).double() for b in ("fused", "reference")]
    for model in models:
        al_ext.Trainer(model, lr=0.05, batch_size=16, optimizer=optimizer, momentum=0.5, progress=False).fit((x, y), epochs=2)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
