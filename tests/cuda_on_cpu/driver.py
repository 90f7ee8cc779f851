"""The kernel driver's entry points (kernel_driver.h) over CPU torch tensors, through ctypes.

Inputs are read, outputs returned as new tensors, and an update's tensors changed in
place, as the CUDA glue's calls would; a launch or guard-byte error raises KernelError.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_double, c_int, c_int64, c_void_p
from pathlib import Path

import torch

FLOAT_TYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # al_ext::cuda::FloatType
ACTIVATIONS = {"elu": 0, "relu": 1, "sigmoid": 2, "tanh": 3, "identity": 4}  # ActivationKind
MAX_UPDATE_TENSORS = 10


class KernelError(RuntimeError):
    pass


class DriverUpdate(ctypes.Structure):  # kernel_driver.h's, field for field
    _fields_ = [("type", c_int), ("kind", c_int), ("count", c_int),
                ("param", c_void_p * 10), ("grad", c_void_p * 10), ("state1", c_void_p * 10), ("state2", c_void_p * 10),
                ("n", c_int64 * 10), ("group", c_int * 10),
                ("beta1", c_double), ("beta2", c_double), ("eps", c_double), ("momentum", c_double),
                ("weight_decay", c_double), ("decoupled_weight_decay", c_int),
                ("lr", c_double * 2), ("step", c_double),
                ("loss_as", c_void_p), ("loss_ae", c_void_p), ("step_count", c_void_p), ("step_count_is_double", c_int),
                ("compute_copy", c_void_p * 10)]


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.device.type == "cpu" and t.is_contiguous(), "the driver takes contiguous CPU tensors"
    return t.data_ptr()


class Kernels:
    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.lib.driver_reduction_blocks.argtypes = [c_int64]
        self.lib.driver_output_mse.argtypes = [c_int] + [c_void_p] * 5 + [c_int64, c_int, c_int]
        self.lib.driver_cross_entropy.argtypes = [c_int] + [c_void_p] * 4 + [c_int64, c_int64, c_int]
        self.lib.driver_activation_backward.argtypes = [c_int] + [c_void_p] * 3 + [c_int64, c_int]
        self.lib.driver_multi_tensor_update.argtypes = [POINTER(DriverUpdate)]

    def convert(self, name: str, values: torch.Tensor, to: torch.dtype) -> torch.Tensor:
        """conversions.cpp's convert_<name> over a 1-D tensor (16-bit types as int16 bits)."""
        out = torch.empty(values.numel(), dtype=to)
        getattr(self.lib, f"convert_{name}")(c_void_p(values.data_ptr()), c_void_p(out.data_ptr()),
                                             c_int64(values.numel()))
        return out

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise KernelError(f"{what}: CUDA error {code}")

    def output_mse(self, out, target, activation, with_dtarget=False, float32_loss=False):
        """(loss, dz, dtarget or None) of MSE(out, target) with out = activation(z); the loss in
        out's dtype, or in float32 with float32_loss."""
        dz, loss = torch.empty_like(out), out.new_empty((), dtype=torch.float32 if float32_loss else out.dtype)
        dtarget = torch.empty_like(out) if with_dtarget else None
        self._check(self.lib.driver_output_mse(FLOAT_TYPES[out.dtype], _ptr(out), _ptr(target), _ptr(dz),
                                               _ptr(dtarget), _ptr(loss), out.numel(), ACTIVATIONS[activation],
                                               int(float32_loss)),
                    "launch_output_mse_backward")
        return loss, dz, dtarget

    def cross_entropy(self, logits, target, float32_loss=False):
        """(loss, dz) of the mean softmax cross-entropy of logits' rows against target's; the
        loss in logits' dtype, or in float32 with float32_loss."""
        dz, loss = torch.empty_like(logits), logits.new_empty((), dtype=torch.float32 if float32_loss else logits.dtype)
        rows, cols = logits.shape
        self._check(self.lib.driver_cross_entropy(FLOAT_TYPES[logits.dtype], _ptr(logits), _ptr(target), _ptr(dz),
                                                  _ptr(loss), rows, cols, int(float32_loss)),
                    "launch_cross_entropy_backward")
        return loss, dz

    def activation_backward(self, grad, y, activation, addend=None):
        """(grad + addend) * activation'(z), written through the output y."""
        result = grad.clone()
        self._check(self.lib.driver_activation_backward(FLOAT_TYPES[grad.dtype], _ptr(result), _ptr(y), _ptr(addend),
                                                        grad.numel(), ACTIVATIONS[activation]),
                    "launch_activation_backward")
        return result

    def update(self, kind, params, grads, state1, state2=None, groups=None, lr=(1e-3, 1e-3), betas=(0.9, 0.999),
               eps=1e-8, momentum=0.0, weight_decay=0.0, decoupled=False, step=1, step_count=None, losses=None,
               compute_copies=None):
        """One launch_multi_tensor_update ('adam' or 'sgd') over the tensors, in place; with
        compute_copies (bfloat16, one per parameter), the update rewrites those too."""
        assert len(params) <= MAX_UPDATE_TENSORS
        u = DriverUpdate(type=FLOAT_TYPES[params[0].dtype], kind={"adam": 0, "sgd": 1}[kind], count=len(params),
                         beta1=betas[0], beta2=betas[1], eps=eps, momentum=momentum, weight_decay=weight_decay,
                         decoupled_weight_decay=int(decoupled), step=float(step))
        u.lr[0], u.lr[1] = lr
        for i, p in enumerate(params):
            u.param[i], u.grad[i], u.state1[i] = _ptr(p), _ptr(grads[i]), _ptr(state1[i])
            u.state2[i] = _ptr(state2[i]) if state2 is not None else None
            u.n[i], u.group[i] = p.numel(), groups[i] if groups is not None else 0
            if compute_copies is not None:
                assert compute_copies[i].dtype == torch.bfloat16 and compute_copies[i].numel() == p.numel()
                u.compute_copy[i] = _ptr(compute_copies[i])
        if losses is not None:
            u.loss_as, u.loss_ae = _ptr(losses[0]), _ptr(losses[1])
        if step_count is not None:
            u.step_count, u.step_count_is_double = _ptr(step_count), int(step_count.dtype == torch.float64)
        self._check(self.lib.driver_multi_tensor_update(ctypes.byref(u)), "launch_multi_tensor_update")
