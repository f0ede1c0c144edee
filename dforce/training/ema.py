"""The exponential moving average of the trained weights (under LoRA the adapters only), FSDP2-safe, and
swapping it into the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from diffusers.training_utils import EMAModel
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def _local(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached aliases of the tensors, FSDP2 shards (DTensors) as this rank's plain local tensors."""
    return [t.detach().to_local() if isinstance(t, DTensor) else t.detach() for t in tensors]


class EMA(EMAModel):
    """diffusers' EMAModel, whose checkpoints hold whole tensors and load back where the EMA lives.

    Under FSDP2 the shadow parameters are shards (DTensors) like the parameters: swapping them in and out
    copies local shards, saving gathers them on every rank (Accelerate calls `state_dict` on all, the main
    process writes) and loading cuts them again. Accelerate loads checkpoints to the CPU; loading moves
    them back to the EMA's devices.
    """

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shadow_params"] = [
            p.full_tensor() if isinstance(p, DTensor) else p for p in state["shadow_params"]
        ]
        return state

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        super().store(_local(parameters))

    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        torch._foreach_copy_(_local(parameters), _local(self.shadow_params))

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        super().restore(_local(parameters))

    def load_state_dict(self, state_dict: dict) -> None:
        like = self.shadow_params
        super().load_state_dict(state_dict)
        self.shadow_params = [
            distribute_tensor(p, old.device_mesh, old.placements)
            if isinstance(old, DTensor)
            else p.to(old.device)
            for p, old in zip(self.shadow_params, like, strict=True)
        ]


@contextlib.contextmanager
def ema_weights(ema: EMAModel, model: torch.nn.Module) -> Iterator[None]:
    """The EMA weights in the model for the duration of a block (validation, export)."""
    params = trained_parameters(model)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(trained_parameters(model))


def trained_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters as the optimiser and EMA hold them: those that train (every weight, or under LoRA
    the adapters only, so that the frozen base has no second copy). FSDP2 keeps the root module's weights
    gathered after a forward without backward (validation), so they are sharded again first."""
    if isinstance(model, FSDPModule):
        model.reshard()
    return [p for p in model.parameters() if p.requires_grad]
