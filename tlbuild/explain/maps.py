"""Heat maps of image files: decode, predict and Grad-CAM in batches; unreadable files kept."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tlbuild.data.images import ImageReadError
from tlbuild.data.preprocess import Preprocessing, load_input
from tlbuild.explain.gradcam import grad_cam, upsample
from tlbuild.explain.overlay import blend, model_view

BATCH = 32


@dataclass
class FileMap:
    """One file's class probabilities and low-resolution heat map (0..1), or why it has none."""

    path: str
    probs: np.ndarray | None = None  # (classes,)
    cam: np.ndarray | None = None  # (h, w) at the feature map's resolution
    flat: bool = False  # the map singles out no region (drawn as a uniform tint)
    error: str | None = None


def pick_device() -> torch.device:
    """The first GPU when there is one: the validation pass is the cost, not the heat maps."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _read(path: str, spec: Preprocessing) -> np.ndarray | str:
    """The preprocessed CHW input, or the reason the file cannot be used."""
    try:
        # exact: the pixels training evaluated, not classify's faster reduced-scale JPEG decode
        return load_input(path, spec, exact=True).array
    except ImageReadError as e:
        return e.reason
    except Exception as e:  # an odd file must not stop the others
        return f"cannot decode: {type(e).__name__}: {e}"


def explain_files(
    model: nn.Module,
    spec: Preprocessing,
    paths: Sequence[str],
    device: torch.device,
    advance: Callable[[int], None] | None = None,
    targets: Sequence[int] | None = None,
) -> list[FileMap]:
    """Probabilities and Grad-CAM maps for `paths`, in order: of `targets` (one class per
    file), by default of each file's top class."""
    model.eval().to(device)
    out: list[FileMap] = []
    for start in range(0, len(paths), BATCH):
        chunk = [FileMap(p) for p in paths[start : start + BATCH]]
        arrays, wanted = [], []
        for j, fm in enumerate(chunk):
            got = _read(fm.path, spec)
            if isinstance(got, str):
                fm.error = got
            else:
                arrays.append(got)
                wanted.append(None if targets is None else targets[start + j])
        if arrays:
            target = None if targets is None else torch.tensor(wanted, device=device)
            ex = grad_cam(model, torch.from_numpy(np.stack(arrays)).to(device), target)
            probs, cams = ex.probs.cpu().numpy(), ex.cams.cpu().numpy()
            readable = [fm for fm in chunk if fm.error is None]
            for i, fm in enumerate(readable):
                fm.probs, fm.cam, fm.flat = probs[i], cams[i], bool(ex.flat[i])
        out += chunk
        if advance is not None:
            advance(len(chunk))
    return out


def overlay_of(fm: FileMap, spec: Preprocessing) -> np.ndarray:
    """The file as the model saw it with its heat map on top, (H, W, 3) 0..1."""
    x = _read(fm.path, spec)
    if isinstance(x, str) or fm.cam is None:  # readable a moment ago: changed under us
        raise ImageReadError(fm.path, x if isinstance(x, str) else "no heat map")
    cam = upsample(torch.from_numpy(fm.cam)[None], tuple(spec.input_size))[0].numpy()
    return blend(model_view(x, spec), cam)
