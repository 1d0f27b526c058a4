"""MSKD: DAFL plus the mode-seeking regulariser of MSGAN (Mao et al., CVPR 2019).

A baseline of the RDSKD paper without a publication of its own: L_G = L_DAFL + w_ms·L_ms with
L_ms = 1 / (mean|G(z₂) − G(z₁)| / mean|z₂ − z₁| + 1e-5) over the two halves of the batch.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from dfkt import losses
from dfkt.dfkd.base import EvenBatch
from dfkt.dfkd.dafl import DAFL, DAFLConfig
from dfkt.registry import METHODS


class MSKDConfig(DAFLConfig):
    gen_batch: EvenBatch = Field(512, ge=2, description="split into two halves for the mode-seeking term")
    w_ms: float = Field(1.0, ge=0, description="weight of the mode-seeking term (MSGAN's λ)")


@METHODS.register("mskd")
class MSKD(DAFL):
    Config = MSKDConfig
    summary = "DAFL plus a mode-seeking diversity term (MSGAN)"
    presets = DAFL.presets

    def objective(self, images: Tensor, z: Tensor) -> dict[str, Tensor]:
        terms = super().objective(images, z)
        l_ms = losses.mode_seeking_loss(images, z)
        return {**terms, "loss": terms["loss"] + self.cfg.w_ms * l_ms, "ms": l_ms}
