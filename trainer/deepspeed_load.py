"""Reading DeepSpeed checkpoints without unpickling arbitrary objects.

DeepSpeed saves its engine and ZeRO optimizer state with `torch.save` and reads it back through
its checkpoint engine with a full unpickling `torch.load`: a checkpoint file could run any code on
resume. `weights_only_loads(engine)` makes the engine read with `weights_only=True` instead,
allowing only the few DeepSpeed classes that its ZeRO-2/3 checkpoints hold (found by reading real
checkpoints with `torch.serialization.get_unsafe_globals_in_checkpoint`; tests/test_scaleout.py
resumes ZeRO-2 and ZeRO-3 through it). Anything else is refused with one line.
"""
from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from trainer.errors import UserError


def allowed_globals() -> list:
    """DeepSpeed's own classes found in its ZeRO checkpoints (loss scaler, stage enum, fragment map)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, saving as it does, loading tensors and allowed classes only."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"holds objects other than tensors and DeepSpeed's checkpoint state, which are not "
                            f"unpickled ({str(e).splitlines()[0][:200]})", where=str(path),
                            hint="resume only from checkpoints this trainer wrote") from None


def weights_only_loads(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints with `weights_only=True` (call before load_checkpoint)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise UserError(f"resume reads DeepSpeed checkpoints through its default torch checkpoint engine only, "
                        f"not {type(current).__name__}", where="DeepSpeed config checkpoint section")
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe
