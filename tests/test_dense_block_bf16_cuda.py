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
from al_ext import fused
from al_ext.engines import ALEngine, FusedALEngine, PipelinedALEngine

from conftest import CUDA_REASON, HAS_CUDA, small_mlp
from test_dense_block import CONFIGS, SHAPES, make_block
from test_dense_block_bf16 import (check_adam_form, check_kept_weights_give_the_step_of_weights_rounded_afresh,
                                   check_sgd_form, check_within_twice_the_error_under_autocast, outputs_of)

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA and fused.bf16_compute_available("cuda")),
    reason=CUDA_REASON if not HAS_CUDA else "this GPU has no bfloat16 tensor cores (compute capability 8.0 or later)")

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_cuda_bf16_step_within_twice_the_error_of_the_reference_under_autocast(shape, config):
    got = check_within_twice_the_error_under_autocast(shape, config, device="cuda")
    assert any(not torch.equal(g, g.bfloat16().float()) for g in got.grads[0::2]), \
        "the weight gradients come out of their GEMM in float32, unrounded"


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


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("ae_loss", ["mse", "cross_entropy"])
def test_cuda_bf16_adam_form_keeps_float32_master_weights_and_state(variant, ae_loss):
    check_adam_form(variant, ae_loss, device="cuda")


def test_cuda_bf16_sgd_form_keeps_float32_master_weights_and_state():
    check_sgd_form(device="cuda")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_cuda_bf16_kept_weights_give_the_step_of_weights_rounded_afresh(optimizer):
    check_kept_weights_give_the_step_of_weights_rounded_afresh(optimizer, device="cuda")


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
