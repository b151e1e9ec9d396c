"""The torch backend of the runner interface: a stage's export wrapper, run eagerly.

`csprt validate` feeds each stage the exact tensors another backend received and compares
outputs stage by stage; this runner is the torch side of that ladder.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.model import LisaModel
from exporter.wrappers import make_wrapper
from graphs.runner import BaseRunner
from graphs.schedule import Schedule
from graphs.stages import DimRange, StageSpec


class TorchStageRunner(BaseRunner):
    """Args:
        stage (StageSpec): the stage to run.
        dims (dict[str, DimRange]): the artifact's named dims.
        model (LisaModel): weights on their device and dtype.
        schedule (Schedule): the artifact's schedule.
        seg_token_id (int): the tokenizer's [SEG] id.
        accm (AccmModels | None): ACCM's models, for an ACCM stage. Defaults to None.
    """

    def __init__(self, stage: StageSpec, dims: dict[str, DimRange], model: LisaModel, schedule: Schedule,
                 seg_token_id: int, accm=None):
        super().__init__(stage, dims)
        self.model, self.schedule, self.seg, self.accm = model, schedule, seg_token_id, accm
        self.wrapper = None

    def _activate(self) -> None:
        self.wrapper = make_wrapper(self.model, self.schedule, self.stage, self.seg, accm=self.accm)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = next(self.model.parameters())
        args = [torch.from_numpy(np.ascontiguousarray(feed[t.name])).to(p.device) for t in self.stage.inputs]
        with torch.no_grad():
            outs = self.wrapper(*args)
        return {t.name: v.detach().float().cpu().numpy().astype(t.dtype) if t.dtype != "int64"
                else v.detach().cpu().numpy() for t, v in zip(self.stage.outputs, outs)}

    def _deactivate(self) -> None:
        self.wrapper = None
