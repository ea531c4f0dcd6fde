"""Deterministic synthetic surface-inspection dataset (ok / scratch / spot / crack).

Each image is a textured manufactured surface under random lighting, with at most one
class of defect drawn on it. Background, lighting and camera parameters come from an RNG
stream that is drawn the same way for every class, so that no global statistic (brightness,
variance, texture family) gives the class away; only the defect does.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("ok", "scratch", "spot", "crack")

_JPEG_QUALITY = 92
_MAX_SIDE = 1024
_MIN_SIDE = 32
# albedo palettes; dark entries stay >= ~0.28 so dark defects remain visible on them
_FABRIC = np.array([(0.32, 0.32, 0.34), (0.28, 0.33, 0.45), (0.72, 0.66, 0.55), (0.42, 0.44, 0.32)])
_PLASTIC = np.array([(0.3, 0.3, 0.31), (0.5, 0.5, 0.5), (0.82, 0.82, 0.8), (0.35, 0.45, 0.6),
                     (0.6, 0.35, 0.3)])  # fmt: skip


def _smooth(rng: np.random.Generator, n: int, cells: float) -> np.ndarray:
    """Roughly zero-mean, unit-scale value noise with about `cells` features across n px."""
    c = max(2, int(round(cells)))
    grid = rng.standard_normal((c + 3, c + 3)).astype(np.float32)
    big = Image.fromarray(grid, "F").resize((n, n), Image.BICUBIC, box=(1, 1, c + 1, c + 1))
    return np.asarray(big, dtype=np.float32)


def _fractal(rng: np.random.Generator, n: int, cells: float, octaves: int, g: float) -> np.ndarray:
    """Multi-octave noise normalised to unit std (cast / sand-blasted look)."""
    out = sum(g**k * _smooth(rng, n, cells * 2**k) for k in range(octaves))
    return (out - out.mean()) / (out.std() + 1e-6)


def _noise1d(rng: np.random.Generator, coord: np.ndarray, spacing: float) -> np.ndarray:
    """1-D noise sampled at `coord` (pixels); streaks and grain lines follow its level sets."""
    lo, hi = float(coord.min()) - 2 * spacing, float(coord.max()) + 2 * spacing
    knots = np.arange(lo, hi, spacing)
    return np.interp(coord, knots, rng.standard_normal(knots.size)).astype(np.float32)


def _rotated(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v) in a frame turned by a random angle: textures have no up."""
    ang = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return x * np.cos(ang) + y * np.sin(ang), -x * np.sin(ang) + y * np.cos(ang)


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float) -> np.ndarray:
    return rng.uniform(lo, hi) * (1 + rng.uniform(-tint, tint, 3))


def _background(rng: np.random.Generator, n: int, z: float) -> np.ndarray:
    """Albedo image (n, n, 3) in ~[0, 1] from one of five surface families."""
    s = n / 160 * z  # pixels per "nominal pixel" at this zoom
    fam = rng.integers(5)
    u, v = _rotated(rng, n)
    if fam == 0:  # brushed metal: fine streaks along u, slowly varying in strength
        t = sum(a * _noise1d(rng, v, sp * s) for a, sp in ((1, 0.8), (0.6, 2.5), (0.4, 7)))
        t = t * (1 + 0.4 * _smooth(rng, n, 3)) * rng.uniform(0.03, 0.09)
        base = _grey(rng, 0.45, 0.8, 0.04)
    elif fam == 1:  # wood-like grain: warped, sharpened growth lines plus fibres
        vw = v + rng.uniform(3, 12) * s * _smooth(rng, n, rng.uniform(1.2, 3))
        period = rng.uniform(8, 22) * s
        rings = ((1 + np.sin(2 * np.pi * vw / period + rng.uniform(0, 6.3))) / 2) ** 3
        t = -rng.uniform(0.07, 0.18) * (rings - rings.mean()) + 0.04 * _noise1d(rng, vw, 1.2 * s)
        base = rng.uniform(0.5, 0.85) * np.array([1.0, 0.78, 0.55]) * rng.uniform(0.95, 1.05, 3)
    elif fam == 2:  # cast / bead-blasted: multi-octave noise plus per-pixel speckle
        t = _fractal(rng, n, rng.uniform(4, 10) / z, 5, rng.uniform(0.55, 0.8))
        t *= rng.uniform(0.05, 0.14)
        t += rng.standard_normal((n, n)).astype(np.float32) * rng.uniform(0.02, 0.06)
        base = _grey(rng, 0.3, 0.65, 0.04)
    elif fam == 3:  # knurled or woven: periodic pattern at a random angle and pitch
        p = rng.uniform(5, 11) * s
        if rng.random() < 0.5:
            u2, _ = _rotated(rng, n)
            t = 0.5 * (np.sin(2 * np.pi * u / p) + np.sin(2 * np.pi * u2 / p))
            base = _grey(rng, 0.4, 0.75, 0.04)
        else:
            fu, fv = u / p, v / p
            over = (np.floor(fu) + np.floor(fv)) % 2 == 0
            t = np.where(over, np.sin(np.pi * (fu % 1)), np.sin(np.pi * (fv % 1))) - 0.64
            t += 0.3 * _noise1d(rng, np.where(over, fv, fu) * p, 0.8 * s)
            base = _FABRIC[rng.integers(len(_FABRIC))] * rng.uniform(0.85, 1.2)
        t = t * rng.uniform(0.08, 0.22)
    else:  # painted / moulded plastic: orange peel and faint flow marks
        t = _fractal(rng, n, 24 / z, 2, 0.5) * rng.uniform(0.01, 0.03) + 0.03 * _smooth(rng, n, 2)
        base = _PLASTIC[rng.integers(len(_PLASTIC))] * rng.uniform(0.9, 1.1)
    return np.clip(base[None, None, :] * (1 + t[..., None]), 0, 1).astype(np.float32)


def _benign(rng: np.random.Generator, img: np.ndarray, n: int) -> None:
    """Harmless structure, equally likely in every class, so 'an edge' alone is no defect."""
    u, v = _rotated(rng, n)
    a, b, c = rng.random(3)
    if a < 0.3:  # part edge / chamfer: a soft step across the whole frame
        edge = (v - rng.uniform(0.2, 0.8) * n) / (rng.uniform(0.5, 2.5) * n / 160)
        step = 0.5 + 0.5 * np.tanh(edge)  # tanh: a sigmoid that cannot overflow
        img *= (1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.12) * step)[..., None]
    if b < 0.3:  # smudge / uneven finish
        img *= (1 + rng.uniform(0.03, 0.07) * _smooth(rng, n, rng.uniform(1.5, 3)))[..., None]
    if c < 0.25:  # faint periodic tool marks
        img *= (
            1 + rng.uniform(0.015, 0.04) * np.sin(2 * np.pi * u / (rng.uniform(6, 20) * n / 160))
        )[..., None]


def _mask(
    n: int, draw: Callable[[ImageDraw.ImageDraw, int], None], blur: float = 0.0
) -> np.ndarray:
    """Anti-aliased coverage mask: draw supersampled, box-downsample, optionally blur (px)."""
    ss = 4 if n <= 256 else 2
    im = Image.new("L", (n * ss, n * ss), 0)
    draw(ImageDraw.Draw(im), ss)
    im = im.resize((n, n), Image.BOX)
    if blur > 0.2:  # blurring after downsampling is 16x cheaper and looks the same
        im = im.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(im, dtype=np.float32) / 255


def _draw_path(
    dr: ImageDraw.ImageDraw, ss: int, pts: np.ndarray, fills: np.ndarray, widths: np.ndarray
) -> None:
    """Polyline with per-segment intensity and width; round joints avoid notches at bends."""
    for q in range(len(pts) - 1):
        if fills[q] > 0:
            w, f = max(1.0, widths[q] * ss), int(fills[q])
            dr.line([tuple(pts[q] * ss), tuple(pts[q + 1] * ss)], fill=f, width=round(w))
            dr.ellipse([*(pts[q + 1] * ss - w / 2), *(pts[q + 1] * ss + w / 2)], fill=f)


def _draw_blob(dr: ImageDraw.ImageDraw, ss: int, poly: np.ndarray, ring: float) -> None:
    pts = [tuple(p) for p in poly * ss]
    if ring > 0:  # water stain: faint interior, dark/light tide mark at the rim
        dr.polygon(pts, fill=70)
        dr.line(pts + pts[:1], fill=255, width=max(1, round(ring * ss)), joint="curve")
    else:
        dr.polygon(pts, fill=255)


def _centre(rng: np.random.Generator, n: int) -> np.ndarray:
    # centres in the central 75% so an 87.5% centre crop still shows the defect
    return n * rng.uniform(0.125, 0.875, 2)


def _apply(
    rng: np.random.Generator, img: np.ndarray, m: np.ndarray, c: float, sign: float | None = None
) -> float:
    """Blend a defect additively with contrast c, picking a sign that has headroom."""
    if sign is None:
        ys, xs = np.nonzero(m > 0.3)
        ys, xs = (ys, xs) if ys.size else np.nonzero(m >= m.max())
        level = float(img[ys, xs].mean())
        sign = 1.0 if rng.random() < np.clip((0.72 - level) / 0.4, 0.1, 0.9) else -1.0
    img += (sign * c) * m[..., None]
    return sign


def _scratch(rng: np.random.Generator, img: np.ndarray, n: int, z: float) -> None:
    k = n / 160 * z
    ang, centre = rng.uniform(0, np.pi), _centre(rng, n)
    parallel = rng.random() < 0.5
    for j in range(rng.integers(1, 4)):
        if j and parallel:  # one event: neighbouring, nearly parallel scratches
            a = ang + rng.normal(0, 0.08)
            off = rng.uniform(4, 18) * k * rng.choice([-1, 1])
            ctr = np.clip(
                centre + off * np.array([-np.sin(ang), np.cos(ang)]), 0.125 * n, 0.875 * n
            )
        else:
            a, ctr = (ang, centre) if j == 0 else (rng.uniform(0, np.pi), _centre(rng, n))
        length = rng.uniform(0.35, 0.85) * n
        d = np.array([np.cos(a), np.sin(a)])
        p0, p2 = ctr - d * length / 2, ctr + d * length / 2
        p1 = ctr + np.array([-d[1], d[0]]) * rng.normal(0, 0.07) * length
        t = np.linspace(0, 1, 33)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
        fills = 255 * np.clip(np.minimum(t, 1 - t)[:, 0] * rng.uniform(4, 12), 0.35, 1)
        fills[rng.random(33) < (0.06 if rng.random() < 0.3 else 0)] = 0  # interrupted contact
        widths = np.full(33, rng.uniform(0.9, 2.4) * k)
        draw = partial(_draw_path, pts=pts, fills=fills, widths=widths)
        _apply(rng, img, _mask(n, draw), rng.uniform(0.22, 0.5))


def _spot(rng: np.random.Generator, img: np.ndarray, n: int, z: float) -> None:
    centre, kind = _centre(rng, n), rng.integers(3)  # 0 stain, 1 pit, 2 water ring
    stain_tint = rng.random() < 0.4  # rust / oil: coloured rather than grey
    sign = None  # one cluster, one substance: all blobs darker or all lighter
    for j in range(rng.integers(1, 5)):
        r = n * z * (rng.uniform(0.022, 0.038) if kind == 1 else rng.uniform(0.035, 0.08))
        ctr = (
            centre if j == 0 else np.clip(centre + rng.normal(0, 2.5 * r, 2), 0.125 * n, 0.875 * n)
        )
        th = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        wobble = sum(
            rng.uniform(0, a) * np.cos(h * th + rng.uniform(0, 6.3))
            for h, a in ((2, 0.15), (3, 0.1), (5, 0.04))
        )
        ecc = rng.uniform(0.75, 1.0)
        rr = r * (1 + wobble)
        poly = np.stack([ctr[0] + rr * np.cos(th), ctr[1] + ecc * rr * np.sin(th)], 1)
        ring = max(1.0, rng.uniform(0.12, 0.25) * r) if kind == 2 else 0.0
        soft = rng.uniform(0.1, 0.35) * r if kind == 0 else rng.uniform(0, 0.6)
        m = _mask(n, partial(_draw_blob, poly=poly, ring=ring), blur=soft)
        # soft edges cost peak contrast, so stains get a little more
        c = rng.uniform(0.28, 0.5) if kind == 0 else rng.uniform(0.22, 0.45)
        if kind == 1:  # pit: dark hole with a light rim on the lit side
            _apply(rng, img, m, c, sign=-1.0)
            shift = np.roll(m, (-1, -1), (0, 1)) - m
            img += (0.5 * c * np.clip(shift, 0, 1))[..., None]
        elif stain_tint:
            sign = -1.0 if float(img.mean()) > 0.3 else 1.0
            img += (sign * c * m)[..., None] * np.array(
                [0.7, 1.0, 1.35] if sign < 0 else [1.2, 1.0, 0.7]
            )
        else:
            sign = _apply(rng, img, m, c, sign)


def _crack(rng: np.random.Generator, img: np.ndarray, n: int, z: float) -> None:
    k = n / 160 * np.sqrt(z)
    step = 2.0 * k

    def walk(p: np.ndarray, a: float, steps: int) -> np.ndarray:
        a0, pts = a, [p]
        for _ in range(steps):
            a += (
                rng.normal(0, 0.3)
                + 0.15 * (a0 - a)
                + (rng.normal(0, 0.8) if rng.random() < 0.08 else 0)
            )
            pts.append(pts[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.cos(a), np.sin(a)]))
        return np.array(pts)

    main = walk(np.zeros(2), rng.uniform(0, 2 * np.pi), int(rng.uniform(0.3, 0.6) * n / step))
    paths = [main]
    for _ in range(rng.integers(0, 3)):
        q = rng.integers(len(main) // 4, 3 * len(main) // 4 + 1)
        heading = np.arctan2(*(main[q] - main[q - 1])[::-1])
        sub = walk(
            main[q],
            heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1),
            int(len(main) * rng.uniform(0.2, 0.5)),
        )
        paths.append(sub)
    allp = np.concatenate(paths)
    lo, hi = allp.min(0), allp.max(0)
    # keep the whole crack in frame when it fits, its centre always in the central 75%
    half = (hi - lo) / 2
    ctr = np.clip(
        _centre(rng, n),
        np.maximum(0.125 * n, half + 0.03 * n),
        np.minimum(0.875 * n, n - half - 0.03 * n),
    )
    shift = np.where(2 * half < 0.75 * n, ctr, n / 2) - (lo + hi) / 2
    w0 = rng.uniform(0.9, 1.9) * k
    m = np.zeros((n, n), np.float32)
    for b, p in enumerate(paths):  # irregular width, thinner branches, tapered tips
        idx = np.arange(len(p))
        taper = np.minimum(1, np.minimum(idx, idx[::-1]) / 4 + 0.3)
        widths = w0 * (0.6 if b else 1.0) * rng.uniform(0.5, 1.5, len(p)) * taper
        draw = partial(_draw_path, pts=p + shift, fills=np.full(len(p), 255), widths=widths)
        m = np.maximum(m, _mask(n, draw))
    if rng.random() < 0.4:  # lip of the fracture catching the light
        img += (rng.uniform(0.08, 0.18) * np.roll(m, (1, 1), (0, 1)))[..., None]
    img *= 1 - rng.uniform(0.5, 0.85) * m[..., None]  # a crack is a shadow: multiplicative
    img -= (0.08 * m)[..., None]  # keep it visible on dark surfaces too


def _camera(rng: np.random.Generator, img: np.ndarray, n: int) -> np.ndarray:
    """Lighting, white balance, optics and sensor noise; returns uint8 RGB."""
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) / n) - 0.5
    g = rng.uniform(-0.35, 0.35, 2)
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    gain = (
        rng.uniform(0.7, 1.25)
        * (1 + g[0] * x + g[1] * y)
        * (1 - rng.uniform(0, 0.4) * ((x - cx) ** 2 + (y - cy) ** 2))
    )
    img = np.clip(img, 0, 1) * gain[..., None] * rng.uniform(0.95, 1.05, 3)
    if rng.random() < 0.3:  # specular highlight band from a bar light
        a = rng.uniform(0, np.pi)
        dist = x * np.cos(a) + y * np.sin(a) - rng.uniform(-0.35, 0.35)
        img += (rng.uniform(0.1, 0.3) * np.exp(-((dist / rng.uniform(0.04, 0.2)) ** 2)))[..., None]
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.8, 1.3) + mean
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    if rng.random() < 0.3:  # slight defocus
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * n / 160))
    noise = rng.standard_normal((n, n, 3)).astype(np.float32) * (255 * rng.uniform(0.003, 0.03))
    return np.clip(np.asarray(out, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8)


_DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray, int, float], None]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
}


def _render(seed: int, ci: int, i: int, n: int) -> np.ndarray:
    # separate streams: background/camera draws are identical in distribution for every
    # class and do not depend on how many random numbers the defect consumed
    bg = np.random.default_rng([seed, 1000 + ci, i])
    z = float(np.exp(bg.uniform(np.log(0.75), np.log(1.35))))
    img = _background(bg, n, z)
    _benign(bg, img, n)
    defect = _DEFECTS.get(CLASSES[ci])
    if defect is not None:
        defect(np.random.default_rng([seed, ci, i]), img, n, z)
    return _camera(bg, img, n)


def _write_atomic(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=_JPEG_QUALITY)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)  # a killed run never leaves a truncated JPEG under a final name
    finally:
        tmp.unlink(missing_ok=True)


def _check_int(name: str, value: object, lo: int, hi: int | None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):  # type: ignore[operator]
        want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {want}, got {value!r}")


def synth_defects(
    out: Path,
    per_class: int,
    size: int = 160,
    seed: int = 0,
    on_image: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Write a deterministic surface-inspection dataset as JPEGs in class folders under out.

    Returns the number of images written per class. Layout is
    ``out/<class>/<class>_<index:05d>.jpg`` (torchvision ImageFolder), RGB, size x size. Image i
    of a class depends only on (seed, class, i, size): a smaller per_class is a prefix of a larger.
    """
    _check_int("per_class", per_class, 1, None)
    _check_int("size", size, _MIN_SIDE, _MAX_SIDE)
    _check_int("seed", seed, 0, None)  # numpy seeds must be non-negative
    out = Path(out)
    counts: dict[str, int] = {}
    for ci, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _write_atomic(folder / f"{name}_{i:05d}.jpg", _render(int(seed), ci, i, int(size)))
            if on_image is not None:
                on_image()
        counts[name] = per_class
    return counts
