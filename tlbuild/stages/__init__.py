"""The stages of a build, in order. Each module exports one Stage as STAGE; add a stage by
writing its module and listing it here."""

from tlbuild.stages import bench, engines, export, quantize, report, train
from tlbuild.stages.base import Stage, StageContext

STAGES: tuple[Stage, ...] = tuple(
    m.STAGE for m in (train, export, quantize, engines, bench, report)
)

__all__ = ["STAGES", "Stage", "StageContext"]
