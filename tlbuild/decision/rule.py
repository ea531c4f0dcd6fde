"""The threshold a model's manifest carries, as `tlbuild classify` applies it by default."""

from __future__ import annotations

from tlbuild.manifest import Manifest


def manifest_threshold(manifest: Manifest, ok_class: str | None) -> tuple[float | None, str]:
    """The manifest's [decision] threshold on p(`ok_class`), and a line saying so for the
    summary; (None, why not) when it is for another class, (None, "") when there is none."""
    d = manifest.decision
    if d is None or ok_class is None:
        return None, ""
    if ok_class != d.ok_class:
        return None, (
            f"The manifest's [decision] threshold is on p({d.ok_class}), not p({ok_class}): "
            "the argmax rule decides"
        )
    ((key, limit),) = d.target.items()
    return d.threshold, (
        f"Decision threshold p({ok_class}) < {d.threshold:g} from the manifest's [decision] "
        f"({key} {limit:g})"
    )
