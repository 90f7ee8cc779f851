"""The fused dense block step with compute_dtype=torch.bfloat16 on the CPU: bf16 GEMMs over
float32 master weights, optimiser state and losses, against al_ext.reference."""
import pytest
import torch

import al_ext
from al_ext import fused, reference
from al_ext.engines import ALEngine, FusedALEngine, PipelinedALEngine
from al_ext.precision import missing_bf16_hardware

from conftest import small_mlp
from test_dense_block import CONFIGS, SHAPES, make_block, zeros_like_block

BF16 = torch.bfloat16
needs_bf16_hardware = pytest.mark.skipif(not fused.bf16_compute_available(),
                                         reason=str(missing_bf16_hardware(torch.device("cpu"))))
pytestmark = needs_bf16_hardware


def max_error(a, b):
    return float((a.double() - b.double()).abs().max())


def reference_under_autocast(s_prev, t_prev, params, **config):
    """What a user's loop computes with torch.autocast in bfloat16: the baseline error."""
    with torch.autocast(s_prev.device.type, dtype=BF16):
        return reference.dense_block_step(s_prev, t_prev, params, **config)


OUTPUT_NAMES = ("s", "t", "loss_as", "loss_ae", *reference.DENSE_PARAMETER_NAMES)


def outputs_of(step):
    return [step.s, step.t, step.loss_as, step.loss_ae, *step.grads]


def check_within_twice_the_error_under_autocast(shape, config, device="cpu"):
    """The flash-attention rule (../shared/design/architecture.md): against the float64 truth,
    the fused bf16 step's error is at most twice that of the reference run under autocast bf16.
    Errors are summed over a few draws: in a tensor of a handful of elements (batch 1) or a
    loss (one number), one draw's rounding errors may cancel by luck in either. Returns the
    last draw's fused step."""
    ours_error = [0.0] * len(OUTPUT_NAMES)
    theirs_error = [0.0] * len(OUTPUT_NAMES)
    scale = [0.0] * len(OUTPUT_NAMES)
    for seed in range(4):
        s64, t64, p64 = make_block(*shape, seed=seed, device=device)
        truth = reference.dense_block_step(s64, t64, p64, **config)
        s32, t32, p32 = s64.float(), t64.float(), [p.float() for p in p64]
        got = fused.dense_block_step(s32, t32, p32, **config, compute_dtype=BF16)
        ref = reference_under_autocast(s32, t32, p32, **config)
        assert got.s.dtype == got.t.dtype == BF16, "s and t come out in bfloat16, as autocast's"
        assert got.loss_as.dtype == got.loss_ae.dtype == torch.float32
        assert all(g.dtype == torch.float32 and g.device.type == device for g in got.grads)
        for i, (ours, theirs, exact) in enumerate(zip(outputs_of(got), outputs_of(ref), outputs_of(truth))):
            ours_error[i] += max_error(ours, exact)
            theirs_error[i] += max_error(theirs, exact)
            scale[i] += float(exact.abs().max())
    for name, ours, theirs, size in zip(OUTPUT_NAMES, ours_error, theirs_error, scale):
        slack = 1e-3 * size  # where the reference happens to be almost exact
        assert ours <= 2 * theirs + slack, f"{name}: error {ours:.3g}, the reference's under autocast {theirs:.3g}"
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_within_twice_the_error_of_the_reference_under_autocast(shape, config):
    check_within_twice_the_error_under_autocast(shape, config)


def test_takes_its_own_bfloat16_outputs_as_the_next_blocks_inputs():
    s_prev, t_prev, params = make_block(17, 20, 33, 65, 9, 5, dtype=torch.float32)
    first = fused.dense_block_step(s_prev, t_prev, params, compute_dtype=BF16)
    _, _, params2 = make_block(17, 33, 12, 24, 9, 9, dtype=torch.float32, seed=1)
    second = fused.dense_block_step(first.s, first.t, params2, compute_dtype=BF16)
    want = fused.dense_block_step(first.s.float(), first.t.float(), params2, compute_dtype=BF16)
    for a, b in zip([second.s, second.t, second.loss_as, *second.grads], [want.s, want.t, want.loss_as, *want.grads]):
        assert torch.equal(a, b), "bf16 inputs are the float32 ones rounded, which the step does itself"


def test_results_repeat_bit_for_bit():
    s_prev, t_prev, params = make_block(64, 50, 31, 100, 13, 13, dtype=torch.float32)
    a, b = (fused.dense_block_step(s_prev, t_prev, params, variant="B", compute_dtype=BF16) for _ in range(2))
    for x, y in zip([a.s, a.t, a.loss_as, a.loss_ae, *a.grads], [b.s, b.t, b.loss_as, b.loss_ae, *b.grads]):
        assert torch.equal(x, y)


def test_opcheck():
    s_prev, t_prev, params = make_block(6, 5, 7, 9, 4, 3, dtype=torch.float32)
    torch.library.opcheck(torch.ops.al_ext.dense_block_step.default,
                          (s_prev, t_prev, params, "elu", "sigmoid", "B", "mse", BF16))
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    torch.library.opcheck(torch.ops.al_ext.dense_block_adam_step_.default,
                          (s_prev, t_prev, params, *state, 1.0, 1e-3, 2e-3, 0.9, 0.999, 1e-8, "elu", "sigmoid", "A",
                           "mse", 0.0, False, BF16))
    torch.library.opcheck(torch.ops.al_ext.dense_block_sgd_step_.default,
                          (s_prev, t_prev, params, state[0], 1e-3, 2e-3, 0.9, "elu", "sigmoid", "B", "mse", 0.0, BF16))
    kept = [p.to(BF16) for p in params]
    torch.library.opcheck(torch.ops.al_ext.dense_block_adam_step_.default,
                          (s_prev, t_prev, params, *state, 2.0, 1e-3, 2e-3, 0.9, 0.999, 1e-8, "elu", "sigmoid", "A",
                           "mse", 0.0, False, BF16, kept))


# torch's optimiser is fed the gradient form's gradients at its own parameters, computed with
# the same bf16 GEMMs but in other tiles (the CPU's update forms round each weight-gradient
# tile to bfloat16, as autocast rounds dW), and its float32 update rounds apart from the op's;
# where that moves a weight across a bf16 rounding boundary, the next gradients differ by a
# bf16 rounding.
BF16_UPDATE_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def assert_bf16_update_matches_torch(fused_update, torch_optimizers, states, device="cpu",
                                     shape=(8, 10, 12, 24, 6, 4), **config):
    """Four steps of the update form, keeping bf16 weight copies, against torch.optim in
    float32: the master weights and every state tensor stay float32, and after each step the
    copies are the updated weights rounded to bfloat16."""
    _, _, params = make_block(*shape, dtype=torch.float32, device=device)
    ours = [p.clone() for p in params]
    kept = [p.to(BF16) for p in ours]
    theirs = [p.clone().requires_grad_(True) for p in params]
    optimizers = torch_optimizers(theirs[:6], theirs[6:])
    for step in range(1, 5):
        s_prev, t_prev, _ = make_block(*shape, dtype=torch.float32, device=device, seed=step)
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


def check_adam_form(variant, ae_loss, device="cpu"):
    config = dict(variant=variant, ae_loss=ae_loss, h_activation="identity" if ae_loss == "cross_entropy" else "sigmoid")
    exp_avg = zeros_like_block(dtype=torch.float32, device=device)
    exp_avg_sq = zeros_like_block(dtype=torch.float32, device=device)
    assert_bf16_update_matches_torch(
        lambda s, t, params, step, kept: fused.dense_block_adam_step_(
            s, t, params, exp_avg, exp_avg_sq, step, 3e-3, 7e-3, **config, compute_dtype=BF16, compute_weights=kept),
        lambda fb, gh: [torch.optim.Adam(fb, lr=3e-3), torch.optim.Adam(gh, lr=7e-3)],
        [exp_avg, exp_avg_sq], device, **config)


def check_sgd_form(device="cpu"):
    buffers = zeros_like_block(dtype=torch.float32, device=device)
    assert_bf16_update_matches_torch(
        lambda s, t, params, step, kept: fused.dense_block_sgd_step_(
            s, t, params, buffers, 1e-2, 2e-2, 0.9, variant="B", compute_dtype=BF16, compute_weights=kept),
        lambda fb, gh: [torch.optim.SGD(fb, lr=1e-2, momentum=0.9), torch.optim.SGD(gh, lr=2e-2, momentum=0.9)],
        [buffers], device, variant="B")


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("ae_loss", ["mse", "cross_entropy"])
def test_adam_form_keeps_float32_master_weights_and_state(variant, ae_loss):
    check_adam_form(variant, ae_loss)


def test_sgd_form_keeps_float32_master_weights_and_state():
    check_sgd_form()


def test_adam_form_updates_weights_larger_than_one_tile():
    """Weights of many weight-gradient tiles (the NECO bridge's shape at batch 32)."""
    s_prev, t_prev, params = make_block(32, 40, 300, 1500, 300, 10, dtype=torch.float32)
    exp_avg, exp_avg_sq = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    ours = [p.clone() for p in params]
    fused.dense_block_adam_step_(s_prev, t_prev, ours, exp_avg, exp_avg_sq, 1, 1e-3, 2e-3, compute_dtype=BF16)
    want = fused.dense_block_step(s_prev, t_prev, params, compute_dtype=BF16)
    theirs = [p.clone().requires_grad_(True) for p in params]
    for p, g in zip(theirs, want.grads):
        p.grad = g
    torch.optim.Adam(theirs[:6], lr=1e-3).step()
    torch.optim.Adam(theirs[6:], lr=2e-3).step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), **BF16_UPDATE_TOLERANCE)


@pytest.mark.parametrize("mangle,message", [
    (lambda s, t, p: (s.double(), t.double(), [q.double() for q in p], BF16), "keeps float32 master weights"),
    (lambda s, t, p: (s, t, p, torch.float16), r"compute_dtype must be None \(the parameters' dtype\) or torch.bfloat16"),
    (lambda s, t, p: (s.double(), t, p, BF16), "s_prev must be float32 or bfloat16 with compute_dtype=torch.bfloat16"),
    (lambda s, t, p: (s, t, p[:2] + [p[2].bfloat16()] + p[3:], BF16), r"params\[2\] \(W_b1\) must have float32"),
])
def test_bad_compute_dtype_is_refused(mangle, message):
    s_prev, t_prev, params, compute_dtype = mangle(*make_block(4, 5, 6, 7, 3, 2, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=message):
        fused.dense_block_step(s_prev, t_prev, params, compute_dtype=compute_dtype)


def test_float32_compute_dtype_is_the_default_step():
    s_prev, t_prev, params = make_block(9, 5, 6, 7, 3, 2, dtype=torch.float32)
    a = fused.dense_block_step(s_prev, t_prev, params)
    b = fused.dense_block_step(s_prev, t_prev, params, compute_dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip([a.s, a.t, a.loss_as, *a.grads], [b.s, b.t, b.loss_as, *b.grads]))


# ---- the Trainer ------------------------------------------------------------------------------

def digits_accuracy(precision, seed=0):
    x, y = al_ext.data.load_digits()
    parts = al_ext.data.split_dataset(x, y, val=0.15, test=0.15, seed=0)
    torch.manual_seed(seed)
    model = al_ext.ALMLP(64, 10, hidden=(64, 64), label_dim=64, bridge_factor=2, first_ae_loss="cross_entropy")
    trainer = al_ext.Trainer(model, lr=2e-3, batch_size=32, precision=precision, progress=False)
    assert isinstance(trainer.engine, FusedALEngine)
    assert all(o.compute_dtype == (BF16 if precision == "bf16" else None) for o in trainer.optimizers)
    trainer.fit(parts.train, epochs=6)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for opt in trainer.optimizers:
        assert all(v.dtype == torch.float32 for state in opt.state.values() for v in state.values())
    return trainer.evaluate(parts.test)["accuracy"]


def test_trainer_bf16_takes_the_fused_step_and_learns_as_float32_does():
    fp32, bf16 = digits_accuracy("fp32"), digits_accuracy("bf16")
    assert bf16 > 0.85 and abs(bf16 - fp32) < 0.05, (fp32, bf16)


def test_trainer_bf16_pipelined_equals_sequential_bit_for_bit():
    x, y = torch.randn(96, 20, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pipeline's stages get one thread each here: the same GEMM rounding
    try:
        runs = []
        for pipeline in (False, True):
            model = small_mlp()
            trainer = al_ext.Trainer(model, batch_size=16, precision="bf16", pipeline=pipeline, threads_per_stage=1,
                                     progress=False)
            assert isinstance(trainer.engine, PipelinedALEngine if pipeline else FusedALEngine)
            trainer.fit((x, y), epochs=2)
            runs.append(([p.detach().clone() for p in model.parameters()], [r["loss_as"] for r in trainer.history]))
    finally:
        torch.set_num_threads(threads)
    (seq, seq_losses), (pipe, pipe_losses) = runs
    assert all(torch.equal(a, b) for a, b in zip(seq, pipe))
    assert seq_losses == pipe_losses


def test_trainer_bf16_falls_back_to_the_general_path_without_bf16_hardware(monkeypatch):
    monkeypatch.setattr(al_ext.engines, "bf16_compute_available", lambda device="cpu": False)
    assert isinstance(al_ext.Trainer(small_mlp(), precision="bf16", progress=False).engine, ALEngine)
    with pytest.raises(ValueError, match="backend='fused' cannot train this way: this CPU has no bfloat16 matrix"):
        al_ext.Trainer(small_mlp(backend="fused"), precision="bf16", progress=False)


# ---- kept bf16 copies of the weights -----------------------------------------------------------

def check_kept_weights_give_the_step_of_weights_rounded_afresh(optimizer, device="cpu"):
    """The update that rewrites the copies as it stores the weights gives the same steps, bit
    for bit, as rounding the weights anew at every step."""
    _, _, params = make_block(17, 20, 33, 65, 9, 5, dtype=torch.float32, device=device)
    runs = []
    for keep in (False, True):
        ours = [p.clone() for p in params]
        states = [[torch.zeros_like(p) for p in ours] for _ in range(2)]
        kept = [p.to(BF16) for p in ours] if keep else None
        outs = []
        for step in range(1, 4):
            s_prev, t_prev, _ = make_block(17, 20, 33, 65, 9, 5, dtype=torch.float32, device=device, seed=step)
            if optimizer == "adam":
                out = fused.dense_block_adam_step_(s_prev, t_prev, ours, *states, step, 1e-3, 2e-3,
                                                   compute_dtype=BF16, compute_weights=kept)
            else:
                out = fused.dense_block_sgd_step_(s_prev, t_prev, ours, states[0], 1e-2, 2e-2, 0.9,
                                                  compute_dtype=BF16, compute_weights=kept)
            outs += list(out)
            if keep:
                assert all(torch.equal(k, p.to(BF16)) for k, p in zip(kept, ours)), "copies follow the update"
        runs.append(outs + ours)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_kept_compute_weights_give_the_same_step_and_stay_the_rounded_parameters(optimizer):
    check_kept_weights_give_the_step_of_weights_rounded_afresh(optimizer)


def test_kept_compute_weights_are_refused_without_bf16_compute():
    s_prev, t_prev, params = make_block(4, 5, 6, 7, 3, 2, dtype=torch.float32)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    kept = [p.to(BF16) for p in params]
    with pytest.raises(RuntimeError, match="compute_weights go with compute_dtype=torch.bfloat16"):
        fused.dense_block_adam_step_(s_prev, t_prev, params, *state, 1, 1e-3, 2e-3, compute_weights=kept)
    with pytest.raises(RuntimeError, match=r"compute_weights\[3\] must be a contiguous bfloat16 tensor"):
        fused.dense_block_adam_step_(s_prev, t_prev, params, *state, 1, 1e-3, 2e-3, compute_dtype=BF16,
                                     compute_weights=kept[:3] + [params[3]] + kept[4:])


def test_optimizer_remakes_its_kept_weights_after_the_parameters_change():
    """A parameter changed outside the op (here in place; a loaded checkpoint alike) is seen
    through its version counter: the next step rounds the parameters anew."""
    block = small_mlp().blocks[0]
    opt = fused.FusedBlockAdam(block, 1e-3, 2e-3, compute_dtype=BF16)
    x, t = torch.randn(8, 20), torch.nn.functional.one_hot(torch.arange(8) % 5, 5).float()
    opt.train_step(x, t)
    with torch.no_grad():
        opt._params()[0].mul_(0.5)  # W_f
    params, exp_avg, exp_avg_sq, steps = opt._state_lists()
    clones = [[p.detach().clone() for p in group] for group in (params, exp_avg, exp_avg_sq)]
    want = fused.dense_block_adam_step_(x, t, *clones, 2, 1e-3, 2e-3, compute_dtype=BF16)  # rounds afresh
    got = opt.train_step(x, t)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(params, clones[0]))


def test_optimizer_remakes_its_kept_weights_after_the_parameters_move():
    """block.to(device) keeps each Parameter and its version but gives it new memory (the
    pipeline places blocks on GPUs so): the kept copies must follow. Here the memory is
    replaced through .data, which torch does not count in the version either."""
    block = small_mlp().blocks[0]
    opt = fused.FusedBlockAdam(block, 1e-3, 2e-3, compute_dtype=BF16)
    x, t = torch.randn(8, 20), torch.nn.functional.one_hot(torch.arange(8) % 5, 5).float()
    opt.train_step(x, t)
    w_f = opt._params()[0]
    version = w_f._version
    w_f.data = w_f.data * 0.5
    assert w_f._version == version
    params, exp_avg, exp_avg_sq, _ = opt._state_lists()
    clones = [[p.detach().clone() for p in group] for group in (params, exp_avg, exp_avg_sq)]
    want = fused.dense_block_adam_step_(x, t, *clones, 2, 1e-3, 2e-3, compute_dtype=BF16)  # rounds afresh
    got = opt.train_step(x, t)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
