"""The fused dense block step with compute_dtype=torch.bfloat16 on CUDA: bf16 GEMMs through
cuBLAS over float32 master weights, optimiser state and losses, against al_ext.reference
under torch.autocast("cuda", bfloat16), and the Trainer's precision="bf16" taking it.

These need a GPU with bf16 tensor cores and skip, saying why, elsewhere; scripts/gpu_check.sh
runs them. The kernels' logic between the GEMMs (float32 losses over bf16 activations, the
float32 update that rewrites the bf16 weight copies) also runs on the CPU, in
tests/test_cuda_kernels_on_cpu.py.
"""
import pytest
import torch

import al_ext
from al_ext import fused, reference
from al_ext.engines import ALEngine, FusedALEngine, PipelinedALEngine

from conftest import CUDA_REASON, HAS_CUDA, small_mlp
from test_dense_block import CONFIGS, SHAPES, make_block

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA and fused.bf16_compute_available("cuda")),
    reason=CUDA_REASON if not HAS_CUDA else "this GPU has no bfloat16 tensor cores (compute capability 8.0 or later)")

OUTPUT_NAMES = ("s", "t", "loss_as", "loss_ae", *reference.DENSE_PARAMETER_NAMES)


def max_error(a, b):
    return float((a.double() - b.double()).abs().max())


def outputs_of(step):
    return [step.s, step.t, step.loss_as, step.loss_ae, *step.grads]


def reference_under_autocast(s_prev, t_prev, params, **config):
    """What a user's loop computes with torch.autocast("cuda", bfloat16): the baseline error."""
    with torch.autocast("cuda", dtype=BF16):
        return reference.dense_block_step(s_prev, t_prev, params, **config)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_cuda_bf16_step_within_twice_the_error_of_the_reference_under_autocast(shape, config):
    """The flash-attention rule (architecture.md): against the float64 truth, the fused bf16
    step's error is at most twice that of the reference under autocast bf16, summed over a few
    draws (one draw's rounding errors may cancel by luck in a tensor of a handful of elements)."""
    ours_error, theirs_error, scale = ([0.0] * len(OUTPUT_NAMES) for _ in range(3))
    for seed in range(4):
        s64, t64, p64 = make_block(*shape, device="cuda", seed=seed)
        truth = reference.dense_block_step(s64, t64, p64, **config)
        s32, t32, p32 = s64.float(), t64.float(), [p.float() for p in p64]
        got = fused.dense_block_step(s32, t32, p32, **config, compute_dtype=BF16)
        ref = reference_under_autocast(s32, t32, p32, **config)
        assert got.s.dtype == got.t.dtype == BF16, "s and t come out in bfloat16, as autocast's"
        assert got.loss_as.dtype == got.loss_ae.dtype == torch.float32
        assert all(g.dtype == torch.float32 and g.is_cuda for g in got.grads)
        assert any(not torch.equal(g, g.bfloat16().float()) for g in got.grads[0::2]), \
            "the weight gradients come out of their GEMM in float32, unrounded"
        for i, (ours, theirs, exact) in enumerate(zip(outputs_of(got), outputs_of(ref), outputs_of(truth))):
            ours_error[i] += max_error(ours, exact)
            theirs_error[i] += max_error(theirs, exact)
            scale[i] += float(exact.abs().max())
    for name, ours, theirs, size in zip(OUTPUT_NAMES, ours_error, theirs_error, scale):
        slack = 1e-3 * size  # where the reference happens to be almost exact
        assert ours <= 2 * theirs + slack, f"{name}: error {ours:.3g}, the reference's under autocast {theirs:.3g}"


def test_cuda_bf16_step_takes_its_own_bfloat16_outputs_and_repeats_bit_for_bit():
    s_prev, t_prev, params = make_block(17, 20, 33, 65, 9, 5, dtype=torch.float32, device="cuda")
    first = fused.dense_block_step(s_prev, t_prev, params, variant="B", compute_dtype=BF16)
    again = fused.dense_block_step(s_prev, t_prev, params, variant="B", compute_dtype=BF16)
    assert all(torch.equal(a, b) for a, b in zip(outputs_of(first), outputs_of(again)))
    _, _, params2 = make_block(17, 33, 12, 24, 9, 9, dtype=torch.float32, device="cuda", seed=1)
    second = fused.dense_block_step(first.s, first.t, params2, compute_dtype=BF16)
    want = fused.dense_block_step(first.s.float(), first.t.float(), params2, compute_dtype=BF16)
    assert all(torch.equal(a, b) for a, b in zip(outputs_of(second), outputs_of(want))), \
        "bf16 inputs are the float32 ones rounded, which the step does itself"


def test_cuda_bf16_opcheck():
    s_prev, t_prev, params = make_block(6, 5, 7, 9, 4, 3, dtype=torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.al_ext.dense_block_step.default,
                          (s_prev, t_prev, params, "elu", "sigmoid", "B", "mse", BF16))
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    kept = [p.to(BF16) for p in params]
    torch.library.opcheck(torch.ops.al_ext.dense_block_adam_step_.default,
                          (s_prev, t_prev, params, *state, 1.0, 1e-3, 2e-3, 0.9, 0.999, 1e-8, "elu", "sigmoid", "A",
                           "mse", 0.0, False, BF16, kept))
    torch.library.opcheck(torch.ops.al_ext.dense_block_adam_step_.step_tensor,
                          (s_prev, t_prev, params, *state, torch.zeros((), device="cuda", dtype=torch.float64),
                           1e-3, 2e-3, 0.9, 0.999, 1e-8, "elu", "sigmoid", "A", "mse", 0.0, False, BF16, kept))
    torch.library.opcheck(torch.ops.al_ext.dense_block_sgd_step_.default,
                          (s_prev, t_prev, params, state[0], 1e-3, 2e-3, 0.9, "elu", "sigmoid", "B", "mse", 0.0,
                           BF16, kept))


# torch's optimiser is fed the gradient form's gradients at its own parameters, which differ
# from the op's by float32 roundings of the two updates; where that moves a weight across a
# bf16 rounding boundary, the next gradients differ by a bf16 rounding (as on the CPU).
BF16_UPDATE_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def assert_cuda_bf16_update_matches_torch(fused_update, torch_optimizers, states, shape=(8, 10, 12, 24, 6, 4),
                                          **config):
    """Four steps of the update form, keeping the bf16 weight copies, against torch.optim in
    float32: the master weights and every state tensor stay float32, and after each step the
    copies are the updated weights rounded to bfloat16."""
    _, _, params = make_block(*shape, dtype=torch.float32, device="cuda")
    ours = [p.clone() for p in params]
    kept = [p.to(BF16) for p in ours]
    theirs = [p.clone().requires_grad_(True) for p in params]
    optimizers = torch_optimizers(theirs[:6], theirs[6:])
    for step in range(1, 5):
        s_prev, t_prev, _ = make_block(*shape, dtype=torch.float32, device="cuda", seed=step)
        out = fused_update(s_prev, t_prev, ours, step, kept)
        want = fused.dense_block_step(s_prev, t_prev, theirs, **config, compute_dtype=BF16)
        assert out[0].dtype == out[1].dtype == BF16 and out[2].dtype == out[3].dtype == torch.float32
        torch.testing.assert_close(out[2], want.loss_as, **BF16_UPDATE_TOLERANCE)
        torch.testing.assert_close(out[3], want.loss_ae, **BF16_UPDATE_TOLERANCE)
        for p, g in zip(theirs, want.grads):
            p.grad = g
        for opt in optimizers:
            opt.step()
        for name, a, b, k in zip(reference.DENSE_PARAMETER_NAMES, ours, theirs, kept):
            assert a.dtype == torch.float32
            assert torch.equal(k, a.to(BF16)), f"step {step} {name}: the kept copy is not the weight rounded"
            torch.testing.assert_close(a, b.detach(), **BF16_UPDATE_TOLERANCE, msg=lambda m: f"step {step} {name}: {m}")
    assert all(s.dtype == torch.float32 for state in states for s in state), "the optimiser's state stays float32"


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("ae_loss", ["mse", "cross_entropy"])
def test_cuda_bf16_adam_form_keeps_float32_master_weights_and_state(variant, ae_loss):
    config = dict(variant=variant, ae_loss=ae_loss, h_activation="identity" if ae_loss == "cross_entropy" else "sigmoid")
    _, _, like = make_block(8, 10, 12, 24, 6, 4, dtype=torch.float32, device="cuda")
    exp_avg, exp_avg_sq = [torch.zeros_like(p) for p in like], [torch.zeros_like(p) for p in like]
    assert_cuda_bf16_update_matches_torch(
        lambda s, t, params, step, kept: fused.dense_block_adam_step_(
            s, t, params, exp_avg, exp_avg_sq, step, 3e-3, 7e-3, **config, compute_dtype=BF16, compute_weights=kept),
        lambda fb, gh: [torch.optim.Adam(fb, lr=3e-3), torch.optim.Adam(gh, lr=7e-3)],
        [exp_avg, exp_avg_sq], **config)


def test_cuda_bf16_sgd_form_keeps_float32_master_weights_and_state():
    _, _, like = make_block(8, 10, 12, 24, 6, 4, dtype=torch.float32, device="cuda")
    buffers = [torch.zeros_like(p) for p in like]
    assert_cuda_bf16_update_matches_torch(
        lambda s, t, params, step, kept: fused.dense_block_sgd_step_(
            s, t, params, buffers, 1e-2, 2e-2, 0.9, variant="B", compute_dtype=BF16, compute_weights=kept),
        lambda fb, gh: [torch.optim.SGD(fb, lr=1e-2, momentum=0.9), torch.optim.SGD(gh, lr=2e-2, momentum=0.9)],
        [buffers], variant="B")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_cuda_bf16_kept_weights_give_the_step_of_weights_rounded_afresh(optimizer):
    """The update that rewrites the copies as it stores the weights gives the same steps, bit
    for bit, as rounding the weights anew at every step."""
    _, _, params = make_block(17, 20, 33, 65, 9, 5, dtype=torch.float32, device="cuda")
    runs = []
    for keep in (False, True):
        ours = [p.clone() for p in params]
        states = [[torch.zeros_like(p) for p in ours] for _ in range(2)]
        kept = [p.to(BF16) for p in ours] if keep else None
        outs = []
        for step in range(1, 4):
            s_prev, t_prev, _ = make_block(17, 20, 33, 65, 9, 5, dtype=torch.float32, device="cuda", seed=step)
            if optimizer == "adam":
                out = fused.dense_block_adam_step_(s_prev, t_prev, ours, *states, step, 1e-3, 2e-3,
                                                   compute_dtype=BF16, compute_weights=kept)
            else:
                out = fused.dense_block_sgd_step_(s_prev, t_prev, ours, states[0], 1e-2, 2e-2, 0.9,
                                                  compute_dtype=BF16, compute_weights=kept)
            outs += list(out)
        runs.append(outs + ours)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_cuda_bf16_update_refuses_a_non_finite_step_on_the_device():
    s_prev, t_prev, params = make_block(4, 6, 5, 7, 3, 2, dtype=torch.float32, device="cuda")
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    kept = [(p.to(BF16).view(torch.int16) + 1).view(BF16) for p in params]  # which the update would overwrite
    before = [t.clone() for t in params + state[0] + state[1] + kept]
    s_prev[2, 3] = float("inf")
    _, _, loss_as, _ = fused.dense_block_adam_step_(s_prev, t_prev, params, *state, 1, 1e-3, 2e-3,
                                                    compute_dtype=BF16, compute_weights=kept)
    assert loss_as.dtype == torch.float32 and not torch.isfinite(loss_as)
    assert all(torch.equal(a, b) for a, b in zip(before, params + state[0] + state[1] + kept))
    # The same with the step count on the device (what the pipeline's CUDA stages pass): not counted.
    count = torch.zeros((), device="cuda", dtype=torch.float64)
    fused.dense_block_adam_step_(s_prev, t_prev, params, *state, count, 1e-3, 2e-3, compute_dtype=BF16,
                                 compute_weights=kept)
    assert float(count) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, params + state[0] + state[1] + kept))
    s_prev[2, 3] = 0.0
    fused.dense_block_adam_step_(s_prev, t_prev, params, *state, count, 1e-3, 2e-3, compute_dtype=BF16,
                                 compute_weights=kept)
    assert float(count) == 1.0
    assert all(torch.equal(k, p.to(BF16)) for k, p in zip(kept, params))


# ---- the Trainer ------------------------------------------------------------------------------

def data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def test_trainer_bf16_on_cuda_takes_the_fused_step_with_float32_master_weights():
    """backend="fused" on CUDA (which "auto" does not pick on CUDA yet, in any precision)."""
    assert isinstance(al_ext.Trainer(small_mlp(), precision="bf16", device="cuda", progress=False).engine, ALEngine)
    model = small_mlp(backend="fused")
    trainer = al_ext.Trainer(model, batch_size=16, precision="bf16", device="cuda", progress=False)
    assert isinstance(trainer.engine, FusedALEngine)
    assert all(o.compute_dtype == BF16 for o in trainer.optimizers)
    history = trainer.fit(data(), epochs=4)
    assert history[-1]["loss_ae"][0] < history[0]["loss_ae"][0], "block 1's label auto-encoder learns"
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    for opt in trainer.optimizers:
        for state in opt.state.values():
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_trainer_bf16_pipelined_on_cuda_trains_as_the_sequential_loop(cuda_graphs):
    """Each stage on a stream of its own (and each step replayed from a CUDA graph), with the
    bf16 weight copies updated by the steps: the parameters of the sequential fused loop. The
    same kernels run in the same order with the same step numbers, so the results are equal
    bit for bit (a rounding flipped anywhere would move an Adam step by up to lr)."""
    runs = []
    for pipeline in (False, True):
        model = small_mlp(hidden=(24, 16, 12), backend="fused")
        options = dict(pipeline=True, max_in_flight=1, cuda_graphs=cuda_graphs) if pipeline else {}
        trainer = al_ext.Trainer(model, batch_size=16, precision="bf16", device="cuda", progress=False, **options)
        assert isinstance(trainer.engine, PipelinedALEngine if pipeline else FusedALEngine)
        trainer.fit(data(), epochs=2)
        torch.cuda.synchronize()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)
