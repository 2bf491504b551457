"""How the student (and optionally the teacher) is spread over data-parallel processes.

``ddp`` (default): Accelerate wraps the student in DistributedDataParallel; every rank holds the
whole model. ``fsdp``: PyTorch's FSDP2 (``fully_shard``) shards every transformer layer and the
rest of the model across ranks, for students (and, with ``teacher.shard``, frozen teachers) that do
not fit one device; it works with gloo on CPUs as with NCCL on GPUs. Both average gradients over
ranks, so the global-batch losses of :mod:`geodistill.distributed` mean the same under either.
State dicts are gathered in full (on CPU) for checkpoints and the saved student, so the student
loads anywhere; a run resumes with the number of processes that wrote its checkpoint (each rank's
place in the data and dropout stream are its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["Parallel"]


class Parallel:
    """The data-parallel strategy of one run: ``ddp`` (also single-process) or ``fsdp``.

    ``unused_parameters``: some trainable parameters get no gradient (an objective of feature terms
    alone), which DDP must then look for after each backward (``find_unused_parameters``; slower,
    so only then): else it waits for their gradients and fails on the next step. FSDP2 needs
    nothing: a parameter without a gradient is left out of its group's reduction."""

    def __init__(self, acc: Any, mode: str, *, unused_parameters: bool = False) -> None:
        if mode not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {mode!r}")
        self.acc = acc
        self.fsdp = mode == "fsdp" and acc.num_processes > 1
        self.unused_parameters = unused_parameters

    @property
    def collective_eval(self) -> bool:
        """FSDP forwards need every rank, so evaluation runs on all of them (the main one records)."""
        return self.fsdp

    def wrap(self, student: nn.Module, optimizer_factory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place ``student`` and build its optimizer (after sharding: FSDP2 parameters are DTensors)."""
        if not self.fsdp:
            from accelerate import DistributedDataParallelKwargs

            student = student.to(self.acc.device)
            if self.unused_parameters:  # as Accelerator(kwargs_handlers=...) would, set where it is known
                self.acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
            model, optimizer = self.acc.prepare(student, optimizer_factory(student))
            if getattr(model, "find_unused_parameters", self.unused_parameters) != self.unused_parameters:
                raise RuntimeError(
                    "Accelerate did not pass find_unused_parameters on to DistributedDataParallel"
                )
            return model, optimizer
        shard_model(student.model, self.acc.device)
        from torch.distributed.fsdp import fully_shard

        mesh = _mesh(self.acc.device)
        for head in student.projectors.values():  # a ModuleDict has no forward of its own to hook
            fully_shard(head, mesh=mesh)
        return student, optimizer_factory(student)

    def unwrap(self, student: nn.Module) -> nn.Module:
        return student if self.fsdp else self.acc.unwrap_model(student)

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module, skip: bool) -> Iterator[None]:
        """Skip the gradient reduction of an accumulation micro-batch (all but the last)."""
        if not skip:
            yield
            return
        if self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
            for m in sharded:
                m.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for m in sharded:
                    m.set_requires_gradient_sync(True, recurse=False)
        else:
            with self.acc.no_sync(module):
                yield

    def clip(self, module: nn.Module, max_norm: float | None) -> float:
        """Gradient norm before clipping (clips when ``max_norm`` is set)."""
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        bound = float("inf") if max_norm is None else max_norm
        if self.fsdp:
            norm = torch.nn.utils.clip_grad_norm_(params, bound)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return float(self.acc.clip_grad_norm_(params, bound))

    # full state dicts: collective under FSDP (every rank calls), complete on every rank otherwise
    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if not self.fsdp:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not self.fsdp:
            module.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: one shard group per transformer layer, then the rest (embeddings, head) at the root.

    The model stays where it was loaded (host memory) until sharded: ``fully_shard`` moves one
    layer at a time to ``device`` and keeps only this rank's shard there, so the whole model is
    never on one device (a model that does not fit one device must not be moved there first)."""
    from torch.distributed.fsdp import fully_shard

    from geodistill.models import transformer_layers

    mesh = _mesh(device)
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _mesh(device: torch.device):
    """A 1-D mesh of every process on ``device``'s kind (gloo CPUs or NCCL GPUs)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))
