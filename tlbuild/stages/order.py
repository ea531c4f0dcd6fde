"""The build, in order: every stage module's STAGE. A new stage is a module in this folder and
one entry here; the runner reads the order and names no stage."""

from __future__ import annotations

from tlbuild.stages import (
    bench,
    conformance,
    decision,
    engines,
    explain,
    export,
    image_models,
    novelty,
    quantize,
    report,
    track,
    train,
)
from tlbuild.stages.base import Stage

STAGES: tuple[Stage, ...] = tuple(
    m.STAGE
    for m in (
        train,
        export,
        quantize,
        image_models,
        engines,
        bench,
        explain,
        novelty,
        decision,
        conformance,
        report,
        track,
    )
)
