"""The fused dense block: Python wrappers of al_ext::dense_block_step,
dense_block_adam_step_ and dense_block_sgd_step_, their fake kernels, and FusedBlockAdam
and FusedBlockSGD, the optimisers that train one ALMLP block with one op call per step."""
from __future__ import annotations

import importlib
import math
import numbers
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ._extension import _C, has_cuda_kernels  # loading the extension registers the ops
from .errors import NonFiniteLossError
from .reference import (ACTIVATION_MODULES, AE_LOSSES, DENSE_PARAMETER_NAMES, VARIANTS, X_ACTIVATIONS, DenseBlockStep,
                        parameter_groups)
from .optim import holds_exactly
from .precision import missing_bf16_hardware
from .validation import check_choice, check_rate, check_tensor


def _number(value: Any, name: str, expected: str, within: Callable[[float], bool]) -> float:
    """A real number for one of the ops' float arguments; ValueError naming it where it is not
    one (a bool, a string, a tensor) or not ``within`` its range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not within(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _fraction(value: Any, name: str) -> float:
    return _number(value, name, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _weight_decay(value: Any) -> float:
    return _number(value, "weight_decay", "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def _adam_settings(betas: Any, eps: Any, weight_decay: Any, decoupled_weight_decay: Any
                   ) -> tuple[float, float, float, float, bool]:
    """(beta1, beta2, eps, weight_decay, decoupled_weight_decay), checked as torch.optim.Adam's."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if not isinstance(decoupled_weight_decay, bool):
        raise TypeError(f"decoupled_weight_decay must be True or False, got {decoupled_weight_decay!r}")
    eps = _number(eps, "eps", "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
    return (_fraction(betas[0], "betas[0]"), _fraction(betas[1], "betas[1]"), eps, _weight_decay(weight_decay),
            decoupled_weight_decay)


def _step_inputs(s_prev: Any, t_prev: Any, params: Any, lrs: tuple[Any, Any]) -> tuple[float, float]:
    """Checks what every form of the op takes first; returns the two learning rates."""
    check_tensor(s_prev, "s_prev"), check_tensor(t_prev, "t_prev")
    if not isinstance(params, Sequence) or not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"params must be a sequence of tensors ({', '.join(DENSE_PARAMETER_NAMES)}), got "
                        f"{type(params).__name__}")
    return check_rate(lrs[0], "lr_fb"), check_rate(lrs[1], "lr_gh")


def dense_block_step(
    s_prev: Tensor,
    t_prev: Tensor,
    params: Sequence[Tensor],
    x_activation: str = "elu",
    h_activation: str = "sigmoid",
    variant: str = "A",
    ae_loss: str = "mse",
    compute_dtype: torch.dtype | None = None,
) -> DenseBlockStep:
    """Forward pass, both local losses and every gradient of one dense block in one call.

    Returns exactly what ``al_ext.reference.dense_block_step`` returns (the specification).
    ``compute_dtype=torch.bfloat16`` (float32 parameters; a CPU with bf16 hardware, or CUDA,
    see ``bf16_compute_available``): the GEMMs take bfloat16 operands with float32
    accumulation, as under ``torch.autocast`` in bfloat16; s and t come out in bfloat16 (as
    autocast's), the losses and the gradients in float32 (on CUDA the weight gradients come
    out of their GEMM unrounded, where autocast rounds them to bfloat16). The update forms
    take it too, and keep the parameters and the optimiser's state float32 (master weights).
    """
    _step_inputs(s_prev, t_prev, params, (0.0, 0.0))
    s, t, loss_as, loss_ae, grads = torch.ops.al_ext.dense_block_step.default(
        s_prev.detach(), t_prev.detach(), [p.detach() for p in params], x_activation, h_activation, variant, ae_loss,
        compute_dtype,
    )
    return DenseBlockStep(s, t, loss_as, loss_ae, list(grads))


def dense_block_adam_step_(
    s_prev: Tensor,
    t_prev: Tensor,
    params: Sequence[Tensor],
    exp_avg: Sequence[Tensor],
    exp_avg_sq: Sequence[Tensor],
    step: int | Tensor,
    lr_fb: float,
    lr_gh: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    x_activation: str = "elu",
    h_activation: str = "sigmoid",
    variant: str = "A",
    ae_loss: str = "mse",
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    compute_dtype: torch.dtype | None = None,
    compute_weights: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A whole training step of one dense block: the gradients of ``dense_block_step``
    applied in place by Adam (torch.optim.Adam's update; ``step`` is the step number after
    this update), with ``lr_fb`` for (f, b) and ``lr_gh`` for (g, h). Returns (s, t, L_as, L_ae).
    ``weight_decay`` is torch.optim.Adam's (L2), or AdamW's with ``decoupled_weight_decay``.

    ``step`` may instead be a one-element float32 or float64 tensor on the parameters'
    device holding the steps taken so far (as torch.optim.Adam's ``capturable`` state): the
    op reads the step number from it and advances it in place when it takes the step. On
    CUDA the number then never visits the host, so the call can be captured in a CUDA graph.

    A step whose loss is not finite changes nothing (nor does it count): the op returns
    the non-finite losses for the caller to see, without raising, on every device (on CUDA
    it never waits for the device). ``FusedBlockAdam.train_step`` raises for them. The SGD
    form behaves the same. ``compute_dtype``: as for ``dense_block_step``; with bfloat16,
    ``compute_weights`` may hold the parameters rounded to bfloat16, kept by the caller between
    steps: the op takes its GEMM operands from them instead of rounding the parameters, and
    rewrites them from the updated parameters (saving a pass over the weights per step). They
    must equal the rounded parameters when the op is called (the SGD form takes them too).
    """
    lr_fb, lr_gh = _step_inputs(s_prev, t_prev, params, (lr_fb, lr_gh))
    beta1, beta2, eps, weight_decay, decoupled_weight_decay = _adam_settings(betas, eps, weight_decay,
                                                                           decoupled_weight_decay)
    if isinstance(step, Tensor):
        op, step_arg = torch.ops.al_ext.dense_block_adam_step_.step_tensor, step.detach()  # advanced in place
    else:
        op = torch.ops.al_ext.dense_block_adam_step_.default
        step_arg = _number(step, "step", "the step number after this update (an integer >= 1)",
                           lambda v: v >= 1 and v == math.floor(v))
    written = [*params, *exp_avg, *exp_avg_sq, *(compute_weights or []), *([step] if isinstance(step, Tensor) else [])]
    out = op(
        s_prev.detach(), t_prev.detach(), [p.detach() for p in params], [m.detach() for m in exp_avg],
        [v.detach() for v in exp_avg_sq], step_arg, lr_fb, lr_gh, beta1, beta2, eps, x_activation, h_activation,
        variant, ae_loss, weight_decay, decoupled_weight_decay, compute_dtype, _detached(compute_weights),
    )
    _mark_written(written)
    return out


def dense_block_sgd_step_(
    s_prev: Tensor,
    t_prev: Tensor,
    params: Sequence[Tensor],
    momentum_buffer: Sequence[Tensor],
    lr_fb: float,
    lr_gh: float,
    momentum: float = 0.9,
    x_activation: str = "elu",
    h_activation: str = "sigmoid",
    variant: str = "A",
    ae_loss: str = "mse",
    weight_decay: float = 0.0,
    compute_dtype: torch.dtype | None = None,
    compute_weights: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A whole training step of one dense block with torch.optim.SGD's momentum update (no
    dampening; zero buffers make the first step use the plain gradient, as torch does) and
    its L2 ``weight_decay``; ``compute_dtype`` as for ``dense_block_step``, ``compute_weights``
    as for ``dense_block_adam_step_``."""
    lr_fb, lr_gh = _step_inputs(s_prev, t_prev, params, (lr_fb, lr_gh))
    out = torch.ops.al_ext.dense_block_sgd_step_.default(
        s_prev.detach(), t_prev.detach(), [p.detach() for p in params], [b.detach() for b in momentum_buffer],
        lr_fb, lr_gh, _fraction(momentum, "momentum"), x_activation, h_activation, variant, ae_loss,
        _weight_decay(weight_decay), compute_dtype, _detached(compute_weights),
    )
    _mark_written([*params, *momentum_buffer, *(compute_weights or [])])
    return out


def _detached(tensors: Sequence[Tensor] | None) -> list[Tensor] | None:
    return None if tensors is None else [t.detach() for t in tensors]


def _mark_written(tensors: list[Tensor]) -> None:
    """Counts the op's in-place writes in the tensors' versions, as torch's in-place ops do, so
    that autograd refuses a backward through a value the update overwrote (the op itself is
    registered for the CPU and CUDA only, where nothing counts them)."""
    torch.autograd.graph.increment_version(tensors)


def bf16_compute_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused step's ``compute_dtype=torch.bfloat16`` runs on ``device`` with
    bfloat16 matrix hardware (al_ext.precision.missing_bf16_hardware). The CPU (the default):
    AVX512_BF16 or AMX with torch's oneDNN, which the CPU kernels need (elsewhere they refuse
    bf16: emulated bf16 GEMMs are slower than float32). CUDA: al_ext built with its CUDA
    kernels and a GPU of compute capability 8.0 or later (cuBLAS emulates bf16 on older ones)."""
    device = torch.device(device)
    if device.type == "cuda" and not (has_cuda_kernels() and torch.cuda.is_available()):
        return False
    return device.type in ("cpu", "cuda") and missing_bf16_hardware(device) is None


def _outputs_like(s_prev: Tensor, t_prev: Tensor, params: Sequence[Tensor], compute_dtype: torch.dtype | None,
                  state: Sequence[Tensor | None] = ()) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """s and t in the compute dtype (the parameters' by default), the losses in the parameters'.
    Every tensor, ``state`` (optimiser state, step count, compute weights) too, must be on
    s_prev's device: one on 'meta' would bring a call here instead of to a kernel."""
    torch._check(len(params) == len(DENSE_PARAMETER_NAMES), lambda: "params must hold the 10 tensors W_f ... c_h")
    named = [("t_prev", t_prev), *zip(DENSE_PARAMETER_NAMES, params), *(("optimiser state", x) for x in state)]
    for name, p in named:
        if isinstance(p, Tensor):
            torch._check(p.device == s_prev.device,
                         lambda: f"{name} must be on s_prev's device {s_prev.device}, got {p.device}")
    n, param_dtype = s_prev.shape[0], params[0].dtype
    act_dtype = param_dtype if compute_dtype is None else compute_dtype
    s = s_prev.new_empty((n, params[0].shape[0]), dtype=act_dtype)
    t = s_prev.new_empty((n, params[6].shape[0]), dtype=act_dtype)
    return s, t, s_prev.new_empty((), dtype=param_dtype), s_prev.new_empty((), dtype=param_dtype)


@torch.library.register_fake("al_ext::dense_block_step")
def _dense_block_step_fake(s_prev, t_prev, params, x_activation, h_activation, variant, ae_loss, compute_dtype=None):
    return (*_outputs_like(s_prev, t_prev, params, compute_dtype), [torch.empty_like(p) for p in params])


@torch.library.register_fake("al_ext::dense_block_adam_step_")
def _dense_block_adam_step_fake(s_prev, t_prev, params, exp_avg, exp_avg_sq, step, lr_fb, lr_gh, beta1, beta2,
                                eps, x_activation, h_activation, variant, ae_loss, weight_decay=0.0,
                                decoupled_weight_decay=False, compute_dtype=None, compute_weights=None):
    return _outputs_like(s_prev, t_prev, params, compute_dtype, [*exp_avg, *exp_avg_sq, *(compute_weights or [])])


@torch.library.register_fake("al_ext::dense_block_adam_step_.step_tensor")
def _dense_block_adam_step_counted_fake(s_prev, t_prev, params, exp_avg, exp_avg_sq, step, lr_fb, lr_gh, beta1,
                                        beta2, eps, x_activation, h_activation, variant, ae_loss, weight_decay=0.0,
                                        decoupled_weight_decay=False, compute_dtype=None, compute_weights=None):
    return _outputs_like(s_prev, t_prev, params, compute_dtype,
                         [*exp_avg, *exp_avg_sq, step, *(compute_weights or [])])


@torch.library.register_fake("al_ext::dense_block_sgd_step_")
def _dense_block_sgd_step_fake(s_prev, t_prev, params, momentum_buffer, lr_fb, lr_gh, momentum, x_activation,
                               h_activation, variant, ae_loss, weight_decay=0.0, compute_dtype=None,
                               compute_weights=None):
    return _outputs_like(s_prev, t_prev, params, compute_dtype, [*momentum_buffer, *(compute_weights or [])])


# ---- ALMLP blocks ----------------------------------------------------------------------

# torch's optimiser functions (torch.optim.adam.adam, torch.optim.sgd.sgd): the modules are
# shadowed by the classes of the same name in torch.optim's namespace.
_torch_adam = importlib.import_module("torch.optim.adam")
_torch_sgd = importlib.import_module("torch.optim.sgd")

_ACTIVATION_NAMES = {module: name for name, module in ACTIVATION_MODULES.items()}


def is_plain(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Whether ``module`` computes exactly what the fused kernel computes for a ``kind``: that
    very class (a subclass may override forward), no hooks, and the kernel's constants."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    if type(module) is not kind or any(hooks):
        return False
    if isinstance(module, nn.ELU):
        return module.alpha == 1.0
    if isinstance(module, nn.Flatten):  # a no-op on (N, features), which is all the kernel takes
        return (module.start_dim, module.end_dim) == (1, -1)
    return True


def _linear_then(seq: nn.Module, what: str, activations: tuple[str, ...]) -> tuple[nn.Linear, str]:
    children = list(seq.children()) if isinstance(seq, nn.Sequential) and is_plain(seq, nn.Sequential) else []
    flattens = [m for m in children if isinstance(m, nn.Flatten)]
    layers = [m for m in children if not isinstance(m, nn.Flatten)]
    if (not layers or not is_plain(layers[0], nn.Linear) or layers[0].bias is None or len(layers) > 2
            or not all(is_plain(m, nn.Flatten) for m in flattens)):
        raise ValueError(f"{what} must be Sequential(Linear with bias[, activation]) for the fused dense block")
    act = "identity" if len(layers) == 1 else _ACTIVATION_NAMES.get(type(layers[1]), type(layers[1]).__name__)
    if act not in activations:
        raise ValueError(f"{what}'s activation must be one of {', '.join(activations)} for the fused dense block, got {act}")
    if len(layers) == 2 and not is_plain(layers[1], type(layers[1])):
        raise ValueError(f"{what}'s {type(layers[1]).__name__} must be plain for the fused dense block (no hooks"
                         f"{', alpha=1' if isinstance(layers[1], nn.ELU) else ''}), got {layers[1]}")
    return layers[0], act


def dense_block_layout(block: nn.Module) -> tuple[list[nn.Parameter], str, str]:
    """(params in DENSE_PARAMETER_NAMES order, x_activation, h_activation) of an ALMLP-style
    block; ValueError, saying what does not fit, for any other block."""
    if not all(isinstance(getattr(block, part, None), nn.Module) for part in ("f", "g", "b", "h")):
        raise TypeError(f"block must be an ALBlock (modules f, g, b and h), got {type(block).__name__}")
    f, x_act = _linear_then(block.f, "f", X_ACTIVATIONS)
    g, _ = _linear_then(block.g, "g", ("sigmoid",))
    h, h_act = _linear_then(block.h, "h", ("sigmoid", "identity"))
    b = list(block.b.children()) if is_plain(block.b, nn.Sequential) else []
    if not (len(b) == 4 and all(is_plain(m, kind) for m, kind in zip(b, (nn.Linear, nn.Sigmoid) * 2))
            and b[0].bias is not None and b[2].bias is not None):
        raise ValueError("b must be Sequential(Linear, Sigmoid, Linear, Sigmoid) for the fused dense block")
    params = [f.weight, f.bias, b[0].weight, b[0].bias, b[2].weight, b[2].bias, g.weight, g.bias, h.weight, h.bias]
    frozen = [name for name, p in zip(DENSE_PARAMETER_NAMES, params) if not p.requires_grad]
    if frozen:  # torch's optimisers leave a parameter without a gradient alone; the fused step updates all ten
        raise ValueError(f"{', '.join(frozen)} {'is' if len(frozen) == 1 else 'are'} frozen (requires_grad=False), "
                         "and the fused dense block updates every parameter of the block")
    return params, x_act, h_act


def _refused(loss_as: Tensor, loss_ae: Tensor, check: bool) -> bool | None:
    """Whether the op refused the step (a non-finite loss): read on the CPU, where it costs
    nothing, and on CUDA only if ``check`` (it waits for the device); None where unknown."""
    if not (check or loss_as.device.type == "cpu"):
        return None
    return not bool(torch.isfinite(loss_as) & torch.isfinite(loss_ae))


def _cuda_graph_step(step: Any) -> Any:
    if not hasattr(_C, "cuda_graph_block_step"):
        raise ValueError("cuda_graph=True needs al_ext built with CUDA; this build has no CUDA support")
    return _C.cuda_graph_block_step(step)


NextLearningRates = Callable[[], tuple[float, float]]


def _value_identities(params: list[Tensor]) -> list[tuple[int, int]]:
    """What changes when a parameter's values may have changed outside the fused op: its
    version (in-place writes) and its memory (a move to another device or dtype). Not seen:
    writes through ``p.data`` (``p.data.copy_(w)``, or ``.data`` assigned a tensor at the
    address it had), which torch keeps out of the version; write with ``p.detach().copy_(w)``
    or ``p.copy_(w)`` under ``torch.no_grad()`` instead, which count."""
    return [(p._version, p.data_ptr()) for p in params]


class FusedBlockOptimizer(torch.optim.Optimizer):
    """An optimiser for one dense ALMLP block whose whole step (forward, local losses,
    gradients and update) is one op call: ``train_step(s_prev, t_prev)``. Two parameter
    groups, (f, b) with ``lr`` and (g, h) with ``ae_lr``; the per-parameter state is that of
    the torch optimiser it matches, so state_dict, checkpoints and schedulers work as usual.
    ``compute_dtype=torch.bfloat16``: the step's GEMMs in bfloat16 over float32 parameters and
    state (see ``dense_block_step``); s and t come out in bfloat16. It keeps the parameters
    rounded to bfloat16 between steps, and rounds them anew after any write it can see
    (``_value_identities``): edit the parameters through ``p.detach()`` or under
    ``torch.no_grad()``, not through ``p.data``."""

    def __init__(self, block: nn.Module, lr: float, ae_lr: float, variant: str, ae_loss: str,
                 defaults: dict[str, Any], compute_dtype: torch.dtype | None = None) -> None:
        params, self.x_activation, self.h_activation = dense_block_layout(block)
        check_rate(lr, "lr"), check_rate(ae_lr, "ae_lr")  # here, not first at the first step
        self.variant = check_choice(variant, "variant", VARIANTS)
        self.ae_loss = check_choice(ae_loss, "ae_loss", AE_LOSSES)
        if compute_dtype not in (None, torch.bfloat16):
            raise ValueError(f"compute_dtype must be None (the parameters' dtype) or torch.bfloat16, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        # bf16 compute: the parameters rounded to bf16, which the op rewrites as it updates them,
        # and what identified the parameters' values when they last matched (see _compute_weights).
        self._kept: list[Tensor] | None = None
        self._kept_identities: list[tuple[int, int]] = []
        super().__init__([{"params": params[:6], "lr": lr}, {"params": params[6:], "lr": ae_lr}], defaults)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _config(self) -> tuple[str, str, str, str]:
        return self.x_activation, self.h_activation, self.variant, self.ae_loss

    def _compute_weights(self, params: list[Tensor]) -> list[Tensor] | None:
        """The bf16 copies of ``params`` for the update forms, made anew where a parameter changed
        since the op last wrote them (a loaded checkpoint, apply_gradients, any in-place edit
        that torch counts in the tensor's version), or moved (``block.to(device)`` keeps the
        Parameter and its version but gives it new memory, as the pipeline does placing blocks
        on GPUs: the copies must follow it); None for compute in the parameters' dtype."""
        if self.compute_dtype is None:
            return None
        if self._kept is None or _value_identities(params) != self._kept_identities:
            self._kept = [p.detach().to(self.compute_dtype) for p in params]
        return self._kept

    def _kept_in_step(self, params: list[Tensor]) -> None:
        """After the op updated ``params`` and rewrote their copies."""
        self._kept_identities = _value_identities(params)

    def _lrs(self) -> tuple[float, float]:
        fb, gh = self.param_groups
        return fb["lr"], gh["lr"]

    def _finish(self, out: tuple[Tensor, Tensor, Tensor, Tensor], check: bool) -> bool | None:
        """After the op: raises NonFiniteLossError for a refused step if ``check``; returns
        whether it was refused (None where unknown). Marks the optimiser as stepped, for
        torch's learning-rate schedulers."""
        self._opt_called = True  # type: ignore[attr-defined]
        refused = _refused(out[2], out[3], check)
        if refused and check:
            which = "L_as" if not bool(torch.isfinite(out[2])) else "L_ae"
            raise NonFiniteLossError(which, (out[2] if which == "L_as" else out[3]).item())
        return refused

    def train_step(self, s_prev: Tensor, t_prev: Tensor, check_finite: bool = True
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One training step of the block on a batch: returns (s, t, L_as, L_ae). A step whose
        loss is not finite changes nothing, and raises NonFiniteLossError. On CUDA that check
        waits for the device; ``check_finite=False`` leaves it to the caller, who sees the
        returned losses (the step was refused all the same)."""
        raise NotImplementedError

    def gradients(self, s_prev: Tensor, t_prev: Tensor) -> DenseBlockStep:
        """The step's first half, for data parallelism: the forward pass, both local losses and
        every gradient (in DENSE_PARAMETER_NAMES order), with no update. ``apply_gradients``
        is the other half, once the gradients are averaged over the replicas."""
        return dense_block_step(s_prev, t_prev, self._params(), *self._config(), self.compute_dtype)

    def apply_gradients(self, grads: Sequence[Tensor], grad_scale: float = 1.0) -> None:
        """The update of ``train_step`` from given gradients, ``grad_scale`` times too large
        (a sum over data-parallel replicas), through torch's own optimiser function on this
        optimiser's state (its fused kernel on the CPU, which unscales as it updates); the
        caller checks that the losses were finite."""
        raise NotImplementedError

    def _torch_kernel(self, grads: Sequence[Tensor], grad_scale: float) -> tuple[list[Tensor], dict[str, Any]]:
        """The gradients and the implementation arguments for torch's optimiser function, which
        takes them unchecked (its fused CPU kernel reads past a gradient too small)."""
        params = self._params()
        if isinstance(grads, Tensor) or not isinstance(grads, Sequence) or len(grads) != len(params):
            raise ValueError(f"grads must hold one gradient per parameter ({', '.join(DENSE_PARAMETER_NAMES)}), got "
                             f"{len(grads) if isinstance(grads, Sequence) else type(grads).__name__}")
        for name, grad, p in zip(DENSE_PARAMETER_NAMES, grads, params):
            if not (isinstance(grad, Tensor) and grad.shape == p.shape and grad.dtype == p.dtype
                    and grad.device == p.device):
                got = (f"{tuple(grad.shape)} {grad.dtype} on {grad.device}" if isinstance(grad, Tensor)
                       else type(grad).__name__)
                raise ValueError(f"the gradient of {name} must be shaped like it, {tuple(p.shape)} {p.dtype} on "
                                 f"{p.device}, got {got}")
        _number(grad_scale, "grad_scale", "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
        if params[0].device.type == "cpu":
            scale = None if grad_scale == 1.0 else torch.tensor(grad_scale)
            return list(grads), {"fused": True, "grad_scale": scale,
                                 "found_inf": None if scale is None else torch.zeros(())}
        return (list(grads) if grad_scale == 1.0 else torch._foreach_div(list(grads), grad_scale)), {}

    def scheduler_step(self, cuda_graph: bool = False, next_lrs: NextLearningRates | None = None) -> Any:
        """This block's step for the C++ scheduler (al_ext.Pipeline), which runs it with no
        Python in the loop; the learning rates are those of the param groups now, and, with
        ``next_lrs``, what it returns after each step taken (a schedule stepped by the worker
        running the block). ``cuda_graph=True`` (CUDA only, constant rates): the step is
        replayed from a CUDA graph after its first call; call ``scheduler_run_done()`` after
        the run."""
        raise NotImplementedError

    def scheduler_run_done(self) -> None:
        """After a run of ``scheduler_step()``'s step: brings the state up to date where the
        step kept part of it on the device (Adam's step count, on CUDA)."""

    def step(self, closure: Any = None) -> None:
        raise RuntimeError(f"{type(self).__name__} computes its own gradients: call train_step(s_prev, t_prev)")


class FusedBlockAdam(FusedBlockOptimizer):
    """torch.optim.Adam (state: step, exp_avg, exp_avg_sq) for one dense block, fused; with
    ``decoupled_weight_decay=True``, torch.optim.AdamW."""

    def __init__(self, block: nn.Module, lr: float, ae_lr: float, variant: str = "A", ae_loss: str = "mse",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, compute_dtype: torch.dtype | None = None) -> None:
        beta1, beta2, eps, weight_decay, decoupled_weight_decay = _adam_settings(betas, eps, weight_decay,
                                                                               decoupled_weight_decay)
        super().__init__(block, lr, ae_lr, variant, ae_loss,
                         {"betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay,
                          "decoupled_weight_decay": decoupled_weight_decay}, compute_dtype)
        self._step_count: Tensor | None = None  # the device's step count during a scheduler run on CUDA

    def _state_lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        params = self._params()
        for p in params:
            if not self.state[p]:
                self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
        states = [self.state[p] for p in params]
        return params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states]

    def _hyper(self) -> dict[str, Any]:
        d = self.defaults
        return {"beta1": d["betas"][0], "beta2": d["betas"][1], "eps": d["eps"], "weight_decay": d["weight_decay"],
                "decoupled_weight_decay": d["decoupled_weight_decay"]}

    def train_step(self, s_prev: Tensor, t_prev: Tensor, check_finite: bool = True
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        params, exp_avg, exp_avg_sq, steps = self._state_lists()
        h = self._hyper()
        out = dense_block_adam_step_(s_prev, t_prev, params, exp_avg, exp_avg_sq, int(steps[0].item()) + 1,
                                     *self._lrs(), (h["beta1"], h["beta2"]), h["eps"], *self._config(),
                                     h["weight_decay"], h["decoupled_weight_decay"], self.compute_dtype,
                                     self._compute_weights(params))
        self._kept_in_step(params)
        if not self._finish(out, check_finite):  # a refused step does not count (unknown: CUDA, unchecked)
            for step in steps:
                step += 1
        return out

    def apply_gradients(self, grads: Sequence[Tensor], grad_scale: float = 1.0) -> None:
        params, exp_avg, exp_avg_sq, steps = self._state_lists()
        h = self._hyper()
        self._opt_called = True  # type: ignore[attr-defined]
        params = [p.detach() for p in params]  # updated in place, as the fused op does
        grads, kernel = self._torch_kernel(grads, grad_scale)
        for group, part in zip(self.param_groups, (slice(0, 6), slice(6, 10))):
            _torch_adam.adam(params[part], grads[part], exp_avg[part], exp_avg_sq[part], [], steps[part], **kernel,
                             decoupled_weight_decay=h["decoupled_weight_decay"], amsgrad=False, beta1=h["beta1"],
                             beta2=h["beta2"], lr=group["lr"], weight_decay=h["weight_decay"], eps=h["eps"],
                             maximize=False)

    def scheduler_step(self, cuda_graph: bool = False, next_lrs: NextLearningRates | None = None) -> Any:
        params, exp_avg, exp_avg_sq, steps = self._state_lists()
        # On CUDA the step number is counted on the device: a replayed graph cannot take it from
        # the host, and a step that the device refuses (a non-finite loss, which the host
        # learns of batches later) must not count.
        on_device = cuda_graph or params[0].is_cuda
        self._step_count = steps[0].to(params[0].device, torch.float64) if on_device else None
        self._opt_called = True  # type: ignore[attr-defined]
        step = _C.fused_adam_block_step([p.detach() for p in params], exp_avg, exp_avg_sq, steps, *self._lrs(),
                                        **self._hyper(), x_activation=self.x_activation,
                                        h_activation=self.h_activation, variant=self.variant, ae_loss=self.ae_loss,
                                        step_count=self._step_count, next_lrs=next_lrs,
                                        compute_dtype=self.compute_dtype,
                                        compute_weights=self._compute_weights(params) or [])
        return _cuda_graph_step(step) if cuda_graph else step

    def scheduler_run_done(self) -> None:
        if self._step_count is not None:
            count = self._step_count.item()  # waits for the device
            for p in self._params():
                self.state[p]["step"].fill_(count)
            self._step_count = None


class FusedBlockSGD(FusedBlockOptimizer):
    """torch.optim.SGD with momentum and L2 weight decay (state: momentum_buffer) for one
    dense block, fused."""

    def __init__(self, block: nn.Module, lr: float, ae_lr: float, variant: str = "A", ae_loss: str = "mse",
                 momentum: float = 0.9, weight_decay: float = 0.0, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__(block, lr, ae_lr, variant, ae_loss,
                         {"momentum": _fraction(momentum, "momentum"), "weight_decay": _weight_decay(weight_decay)},
                         compute_dtype)

    def _state_lists(self) -> tuple[list[Tensor], list[Tensor]]:
        params = self._params()
        for p in params:
            if not self.state[p]:
                self.state[p] = {"momentum_buffer": torch.zeros_like(p)}
        return params, [self.state[p]["momentum_buffer"] for p in params]

    def train_step(self, s_prev: Tensor, t_prev: Tensor, check_finite: bool = True
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        params, buffers = self._state_lists()
        d = self.defaults
        out = dense_block_sgd_step_(s_prev, t_prev, params, buffers, *self._lrs(), d["momentum"], *self._config(),
                                    d["weight_decay"], self.compute_dtype, self._compute_weights(params))
        self._kept_in_step(params)
        self._finish(out, check_finite)
        return out

    def apply_gradients(self, grads: Sequence[Tensor], grad_scale: float = 1.0) -> None:
        params, buffers = self._state_lists()
        d = self.defaults
        self._opt_called = True  # type: ignore[attr-defined]
        params = [p.detach() for p in params]  # updated in place, as the fused op does
        grads, kernel = self._torch_kernel(grads, grad_scale)
        for group, part in zip(self.param_groups, (slice(0, 6), slice(6, 10))):
            # The buffers start at zero, so the first step moves by the gradient, as torch's does.
            _torch_sgd.sgd(params[part], grads[part], buffers[part], **kernel, weight_decay=d["weight_decay"],
                           momentum=d["momentum"], lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)

    def scheduler_step(self, cuda_graph: bool = False, next_lrs: NextLearningRates | None = None) -> Any:
        params, buffers = self._state_lists()
        d = self.defaults
        self._opt_called = True  # type: ignore[attr-defined]
        step = _C.fused_sgd_block_step([p.detach() for p in params], buffers, *self._lrs(), d["momentum"],
                                       *self._config(), weight_decay=d["weight_decay"], next_lrs=next_lrs,
                                       compute_dtype=self.compute_dtype,
                                       compute_weights=self._compute_weights(params) or [])
        return _cuda_graph_step(step) if cuda_graph else step


def _check_takes_over(block: nn.Module, fb: torch.optim.Optimizer, gh: torch.optim.Optimizer) -> None:
    """What the fused optimiser keeps of ``fb`` and ``gh``: one learning rate each, and no
    state; so they must be over the block's (f, b) and (g, h), one rate each, not yet stepped."""
    for name, opt, params in zip(("fb", "gh"), (fb, gh), parameter_groups(block)):
        if not holds_exactly(opt, params):
            raise ValueError(f"{name} must be over the block's {name[0]} and {name[1]} parameters exactly")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        if any(setting != settings[0] for setting in settings[1:]):
            raise ValueError(f"{name}'s parameter groups differ in their settings (learning rate, weight decay, ...); "
                             "the fused step has one setting for f and b and one for g and h")
        if opt.state:
            raise ValueError(f"{name} has stepped already; the fused optimiser starts from a fresh state (load a "
                             "state_dict into it instead)")


def fused_block_optimizer(block: nn.Module, fb: torch.optim.Optimizer, gh: torch.optim.Optimizer, variant: str,
                          ae_loss: str, compute_dtype: torch.dtype | None = None) -> FusedBlockOptimizer:
    """The fused optimiser that does what the torch optimisers ``fb`` (over f and b) and
    ``gh`` (over g and h) would: Adam, AdamW or SGD with momentum, with their learning rates
    and hyperparameters, computing in ``compute_dtype``. ValueError, saying what does not fit,
    for any other."""
    if type(fb) is not type(gh):
        raise ValueError(f"the two optimisers of a block must be of one type, got {type(fb).__name__} and "
                         f"{type(gh).__name__}")
    shared = {k: v for k, v in fb.defaults.items() if k not in ("lr", "foreach", "fused", "capturable")}
    if shared != {k: v for k, v in gh.defaults.items() if k not in ("lr", "foreach", "fused", "capturable")}:
        raise ValueError("the two optimisers of a block must differ in their learning rate alone")
    _check_takes_over(block, fb, gh)
    d = {**fb.defaults, **{k: v for k, v in fb.param_groups[0].items() if k != "params"}}  # the groups' own
    lr, ae_lr = fb.param_groups[0]["lr"], gh.param_groups[0]["lr"]
    if d.get("maximize") or d.get("differentiable"):
        raise ValueError("maximize=True and differentiable=True have no fused form")
    if type(fb) in (torch.optim.Adam, torch.optim.AdamW):
        if d.get("amsgrad"):
            raise ValueError("amsgrad=True has no fused form")
        if isinstance(d["lr"], Tensor) or isinstance(d["betas"][0], Tensor):
            raise ValueError("tensor learning rates or betas have no fused form")
        decoupled = type(fb) is torch.optim.AdamW or bool(d.get("decoupled_weight_decay", False))
        return FusedBlockAdam(block, lr, ae_lr, variant, ae_loss, tuple(d["betas"]), d["eps"], d["weight_decay"],
                              decoupled, compute_dtype)
    if type(fb) is torch.optim.SGD:
        if d.get("nesterov") or d.get("dampening", 0) != 0:
            raise ValueError("SGD with nesterov=True or dampening has no fused form")
        return FusedBlockSGD(block, lr, ae_lr, variant, ae_loss, d["momentum"], d["weight_decay"], compute_dtype)
    raise ValueError(f"{type(fb).__name__} has no fused form (the fused step has torch.optim.Adam, AdamW and SGD)")
