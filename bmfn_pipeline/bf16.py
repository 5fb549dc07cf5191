"""bf16 training with the weights cast once per step, not once per use: the same arithmetic, fewer kernels.

Under bf16 autocast every step casts each weight of a matrix product to bf16 (a kernel per weight) and backward
casts its gradient back to float32 (another): about 190 of a BMFN step's 1,068 operations
(`benchmarks/train_step.py ops`). A graphed step on a GPU is bound by its number of kernels, not by its FLOPs
(graphs.py). BF16Weights keeps those weights in one flat float32 buffer and the network computes with bf16 copies
held in a second flat buffer, refreshed by one copy per step; their gradients, as backward makes them, are gathered
into a flat bf16 buffer and copied into the float32 gradients at once. Every value is the one autocast computes:
the bf16 copies are autocast's casts, made earlier, and each gradient reaches float32 as autocast's cast back
would bring it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode


class BF16Weights:
    """Calls `model(visual, audio)` with bf16 copies of the weights that autocast would cast (found by watching one
    forward on `sample`: the parameters it uses only through bf16 casts); `backward(loss)` leaves their gradients
    in float32, where the optimiser and gradient clipping find them as usual. The model's parameters become views
    of one flat buffer: state_dict, checkpoints and evaluation see ordinary float32 parameters."""

    def __init__(self, model: nn.Module, sample: dict[str, Tensor]) -> None:
        parameters = dict(model.named_parameters())
        names = cast_only(model, sample)
        device = sample["audio"].device
        total = sum(parameters[name].numel() for name in names)
        self.master, self.master_grad = torch.empty(total, device=device), torch.zeros(total, device=device)
        self.half = torch.empty(total, dtype=torch.bfloat16, device=device)
        self.half_grad = torch.empty_like(self.half)
        self.model, self.copies, self.grads, offset = model, {}, {}, 0
        for name in names:
            parameter = parameters[name]
            part = slice(offset, offset + parameter.numel())
            offset = part.stop
            self.master[part].copy_(parameter.detach().flatten())
            parameter.data = self.master[part].view_as(parameter)
            self.grads[parameter] = parameter.grad = self.master_grad[part].view_as(parameter)
            self.copies[name] = self.half[part].view_as(parameter).detach().requires_grad_()

    def __call__(self, visual: Tensor, audio: Tensor):
        with torch.no_grad():
            self.half.copy_(self.master)  # the optimiser changed the float32 weights since the last step
        return torch.func.functional_call(self.model, self.copies, (visual, audio))

    def backward(self, loss: Tensor) -> None:
        """The copies' gradients are taken as backward makes them (none is added into zeros, which would be a
        kernel each) and gathered by one concatenation; the float32 gradients get them by one copy, and are the
        parameters' `.grad` again whether or not the optimiser's zero_grad set them to None."""
        for copy in self.copies.values():
            copy.grad = None
        loss.backward()
        grads = [torch.zeros_like(copy) if copy.grad is None else copy.grad for copy in self.copies.values()]
        torch.cat([grad.flatten() for grad in grads], out=self.half_grad)
        self.master_grad.copy_(self.half_grad)
        for parameter, grad in self.grads.items():
            parameter.grad = grad


def cast_only(model: nn.Module, sample: dict[str, Tensor]) -> list[str]:
    """The parameters that one bf16-autocast forward of `model` on `sample` uses only through bf16 casts (of them
    or of views of them). The forward changes nothing: dropout draws from a forked generator, and BatchNorm's
    running statistics are put back."""
    owner = {parameter.untyped_storage().data_ptr(): name for name, parameter in model.named_parameters()}
    uses: dict[str, set[str]] = {}

    class Uses(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not func.is_view:
                kind = "bf16 cast" if func is torch.ops.aten._to_copy.default and \
                    kwargs.get("dtype") == torch.bfloat16 else func.__name__
                for arg in (*args, *kwargs.values()):
                    if isinstance(arg, Tensor) and arg.untyped_storage().data_ptr() in owner:
                        uses.setdefault(owner[arg.untyped_storage().data_ptr()], set()).add(kind)
            return func(*args, **kwargs)

    device = sample["audio"].device
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), Uses():
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            model(sample["visual"][:2], sample["audio"][:2])
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return [name for name in dict(model.named_parameters()) if uses.get(name) == {"bf16 cast"}]
