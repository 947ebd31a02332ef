"""Procedural multi-domain street scenes with pixel-exact labels (the synthetic default).

Every image is a perspective street: road with lane markings, sidewalks, building facades or
parks (vegetation, terrain, fences, walls) on both sides, a distant skyline and sky, and objects
(cars, trucks, buses, persons, riders on bicycles, poles with traffic signs or lights, trees)
painted far-to-near. Layout statistics are shared by all domains; appearance differs per
domain the way real datasets do: class colours, textures (grain, bricks, stripes, blotches),
illumination (brightness, gradients, cast shadows, night lights), fog, rain, blur and noise.

Domain 0 is written in the real GTA5 layout (palette PNG labels whose index is the Cityscapes
labelId); the others in the Cityscapes layout (``gtFine_labelIds`` PNGs, split ``val``), so the
regular readers (:mod:`blindseg_dist.data.sources`) read them unchanged.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import atomic
from .labels import CLASS_INDEX, CLASS_NAMES, IGNORE, NUM_CLASSES, cityscapes_palette_png
from .labels import train_to_cityscapes_ids

C = CLASS_INDEX  # class name -> trainId
FORMAT = "blindseg-synth/1"


@dataclass(frozen=True)
class DomainStyle:
    """How one rendering domain looks (everything except the scene layout)."""

    name: str
    """Folder name; domain 0 is written as ``gta5``."""
    tint: tuple[float, float, float]
    """Per-channel illumination colour (multiplies the image)."""
    brightness: float
    """Global exposure factor."""
    contrast: float
    """Contrast around mid grey."""
    saturation: float
    """1 = unchanged, 0 = grey."""
    palette_jitter: float
    """Std of the fixed per-class colour offsets of this domain (0..255 units)."""
    texture: str
    """Texture family: grain | bricks | stripes | blotches."""
    texture_strength: float
    """Relative amplitude of the texture."""
    gradient: float
    """Vertical illumination gradient (bottom brighter when > 0)."""
    shadow: float
    """Strength of cast shadows (0 = none)."""
    fog: float
    """Fog density per unit depth (0 = clear)."""
    fog_colour: tuple[float, float, float]
    """Fog colour in [0, 1]."""
    lights: float
    """Strength of lamp / headlight glows (night)."""
    rain: float
    """Strength of rain streaks."""
    blur: float
    """Gaussian blur sigma in px at 512 px width."""
    noise: float
    """Sensor noise std in [0, 1] units."""


DOMAINS: tuple[DomainStyle, ...] = (
    DomainStyle("gta5", (1.0, 1.0, 1.0), 1.0, 1.1, 1.15, 0.0, "grain", 0.10, 0.15, 0.35,
                0.0, (1, 1, 1), 0.0, 0.0, 0.0, 0.01),
    DomainStyle("synth_night", (0.8, 0.9, 1.15), 0.5, 1.0, 0.7, 16.0, "bricks", 0.16, -0.3,
                0.0, 0.0, (0, 0, 0), 0.8, 0.0, 0.6, 0.04),
    DomainStyle("synth_fog", (1.0, 1.0, 1.03), 1.05, 0.85, 0.75, 14.0, "blotches", 0.12, 0.05,
                0.1, 0.12, (0.78, 0.8, 0.82), 0.0, 0.0, 1.0, 0.02),
    DomainStyle("synth_rain", (0.9, 0.95, 1.05), 0.7, 1.0, 0.55, 16.0, "stripes", 0.15, 0.1, 0.0,
                0.08, (0.55, 0.58, 0.62), 0.2, 1.0, 0.8, 0.03),
    DomainStyle("synth_dusk", (1.3, 0.9, 0.65), 0.8, 1.2, 1.1, 20.0, "bricks", 0.14, -0.45, 0.55,
                0.03, (0.9, 0.6, 0.4), 0.35, 0.0, 0.3, 0.02),
    DomainStyle("synth_snow", (1.0, 1.02, 1.08), 1.15, 0.75, 0.6, 15.0, "blotches", 0.2, 0.1,
                0.2, 0.05, (0.92, 0.93, 0.96), 0.0, 0.0, 0.5, 0.02),
)

# Natural colours (0..255) of every class in the source domain.
_BASE_COLOURS = np.array([
    (92, 90, 96), (150, 142, 132), (156, 128, 106), (168, 160, 146), (128, 104, 78),
    (112, 112, 116), (45, 45, 40), (200, 50, 45), (62, 118, 44), (136, 148, 76), (128, 176, 232),
    (70, 60, 110), (160, 60, 40), (120, 20, 20), (210, 210, 205), (230, 180, 40), (90, 90, 140),
    (20, 20, 20), (40, 80, 160)], dtype=np.float32)
_INSTANCE_JITTER = np.zeros(NUM_CLASSES, dtype=np.float32)
_INSTANCE_JITTER[[C["building"], C["wall"], C["traffic sign"]]] = 18.0
_INSTANCE_JITTER[[C["person"], C["rider"], C["bicycle"], C["motorcycle"]]] = 45.0
_INSTANCE_JITTER[[C["car"], C["truck"], C["bus"]]] = 70.0
# Snow covers the ground and vegetation a little in its domain.
_SNOWY = np.array([C["sidewalk"], C["vegetation"], C["terrain"], C["building"]])


def _domain_colours(index: int) -> np.ndarray:
    """Fixed (19, 3) class colours of domain ``index`` (independent of the seed)."""
    style = DOMAINS[index]
    rng = np.random.default_rng([7919, index])
    cols = _BASE_COLOURS + rng.normal(0.0, style.palette_jitter, size=_BASE_COLOURS.shape)
    if style.name == "synth_snow":
        cols[_SNOWY] = 0.45 * cols[_SNOWY] + 0.55 * 235.0
    return np.clip(cols, 0, 255).astype(np.float32)


class _Canvas:
    """Label, instance and depth maps being painted far-to-near."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.label = np.full((h, w), C["sky"], dtype=np.uint8)
        self.inst = np.zeros((h, w), dtype=np.int32)
        self.depth = np.full((h, w), 60.0, dtype=np.float32)
        self.n_inst = 0
        self.hz, self.vx = h // 2, w / 2
        self.lights: list[tuple[float, float, float]] = []  # (y, x, radius)
        self.shadows: list[tuple[float, float, float, float]] = []  # ellipse (cy, cx, ry, rx)

    def new_instance(self) -> int:
        self.n_inst += 1
        return self.n_inst

    def _box(self, y0, y1, x0, x1):
        y0, y1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h)
        x0, x1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w)
        return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None

    def _paint(self, box, mask, cls: int, inst: int, depth: float) -> None:
        y0, y1, x0, x1 = box
        sl = (slice(y0, y1), slice(x0, x1))
        self.label[sl][mask] = cls
        self.inst[sl][mask] = inst
        self.depth[sl][mask] = depth

    def rect(self, y0, y1, x0, x1, cls, inst, depth) -> None:
        box = self._box(y0, y1, x0, x1)
        if box:
            self._paint(box, np.ones((box[1] - box[0], box[3] - box[2]), bool), cls, inst, depth)

    def ellipse(self, cy, cx, ry, rx, cls, inst, depth) -> None:
        ry, rx = max(ry, 0.5), max(rx, 0.5)
        box = self._box(cy - ry, cy + ry + 1, cx - rx, cx + rx + 1)
        if box:
            yy = (np.arange(box[0], box[1], dtype=np.float32)[:, None] + 0.5 - cy) / ry
            xx = (np.arange(box[2], box[3], dtype=np.float32)[None, :] + 0.5 - cx) / rx
            self._paint(box, yy * yy + xx * xx <= 1.0, cls, inst, depth)

    def ring(self, cy, cx, r, width, cls, inst, depth) -> None:
        box = self._box(cy - r, cy + r + 1, cx - r, cx + r + 1)
        if box:
            yy = np.arange(box[0], box[1], dtype=np.float32)[:, None] + 0.5 - cy
            xx = np.arange(box[2], box[3], dtype=np.float32)[None, :] + 0.5 - cx
            d = np.sqrt(yy * yy + xx * xx)
            self._paint(box, (d <= r) & (d >= r - max(width, 1.0)), cls, inst, depth)


def _side_blocks(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks along one street side: far edges in depth Z, kind (0 building, 1 park, 2 walled
    building), and height factor."""
    z, edges = 0.4, []
    while z < 40:
        z += rng.uniform(0.6, 3.0) * (1 + z / 8)
        edges.append(z)
    n = len(edges)
    kind = rng.choice(3, size=n, p=[0.62, 0.23, 0.15])
    height = rng.uniform(0.8, 4.0, size=n)
    return np.array(edges), kind, height


def _scene(rng: np.random.Generator, h: int, w: int) -> _Canvas:
    """Sample a street layout and paint labels, instances and depth."""
    cv = _Canvas(h, w)
    hz = int(h * rng.uniform(0.36, 0.54))  # horizon row
    gh = h - hz  # ground height in px
    vx = w * rng.uniform(0.38, 0.62)  # vanishing point column
    cv.hz, cv.vx = hz, vx
    road = w * rng.uniform(0.25, 0.55, size=2)  # road half widths (left, right) at t = 1
    side = w * rng.uniform(0.08, 0.3, size=2)  # sidewalk widths at t = 1
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    t = np.clip((yy - hz + 0.5) / gh, 0, None)  # (H, 1) ground depth factor = 1 / Z

    _skyline(cv, rng, yy)
    _ground(cv, yy, xx, t, road, side)
    _sides(cv, rng, yy, xx, road, side)
    _objects(cv, rng, road, side)
    if rng.random() < 0.3:  # ego-vehicle hood (void), as in Cityscapes
        hood = rng.uniform(0.06, 0.12) * h
        cv.ellipse(h + hood * 1.5, w / 2, hood * 2.5, w * 0.75, IGNORE, 0, 0.5)
    return cv


def _skyline(cv: _Canvas, rng, yy: np.ndarray) -> None:
    """Distant skyline (far buildings or tree line) just above the horizon."""
    hz, w = cv.hz, cv.w
    cols = np.arange(w)
    n_far = int(rng.integers(6, 16))
    far_edges = np.sort(rng.uniform(0, w, n_far))
    far_h = rng.uniform(0.0, 0.12, n_far + 1) * hz
    far_top = hz - far_h[np.searchsorted(far_edges, cols)]
    far_cls = C["building"] if rng.random() < 0.7 else C["vegetation"]
    far = (yy >= far_top[None, :]) & (yy < hz)
    cv.label[far], cv.depth[far] = far_cls, 40.0


def _ground(cv: _Canvas, yy: np.ndarray, xx: np.ndarray, t: np.ndarray, road, side) -> None:
    """Ground: terrain beyond the sidewalks, sidewalks, road."""
    h, w, hz, vx = cv.h, cv.w, cv.hz, cv.vx
    gh = h - hz
    ground = np.broadcast_to(yy >= hz, (h, w))
    road_l, road_r = vx - t * road[0], vx + t * road[1]
    side_l, side_r = road_l - t * side[0], road_r + t * side[1]
    lab = np.where((xx >= road_l) & (xx < road_r), C["road"],
                   np.where((xx >= side_l) & (xx < side_r), C["sidewalk"], C["terrain"]))
    cv.label[ground] = lab.astype(np.uint8)[ground]
    cv.depth[ground] = np.broadcast_to(1.0 / np.maximum(t, 1.0 / gh), (h, w))[ground]


def _sides(cv: _Canvas, rng, yy: np.ndarray, xx: np.ndarray, road, side) -> None:
    """Facades / parks on both sides, converging to the vanishing point."""
    h, w, hz, vx = cv.h, cv.w, cv.hz, cv.vx
    gh = h - hz
    for sign, width in ((-1, road[0] + side[0]), (1, road[1] + side[1])):
        edges, kind, height = _side_blocks(rng)
        off = sign * (xx[0] - vx)
        valid = off > 0
        tb = np.where(valid, off / width, 1e-6)  # depth factor of the facade base
        b = np.minimum(np.searchsorted(edges, 1.0 / tb), len(edges) - 1)
        base = hz + tb * gh  # base row of the facade at each column
        k = kind[b]
        unit = tb * gh  # camera height in px at that depth
        tree_line = 1.2 + 0.6 * np.sin(xx[0] * 0.07 + b)  # bumpy canopy of parks
        top = hz - unit * np.where(k == 1, tree_line, height[b])
        region = valid & (yy >= top) & (yy < base)
        cls = np.where(k == 1, C["vegetation"], C["building"])[None, :].repeat(h, 0)
        park_ground = (k == 1) & (yy >= hz + 0.45 * unit)
        cls = np.where(park_ground, C["terrain"], cls)
        fence = (k == 1) & (yy >= base - 0.45 * unit) & (rng.random() < 0.7)
        wall = (k == 2) & (yy >= base - 0.6 * unit)
        cls = np.where(fence, C["fence"], np.where(wall, C["wall"], cls))
        cv.label[region] = cls[region].astype(np.uint8)
        cv.depth[region] = np.broadcast_to(1.0 / tb, (h, w))[region]
        cv.inst[region] = np.broadcast_to(1000 + sign * 100 + b, (h, w))[region]


def _objects(cv: _Canvas, rng, road, side) -> None:
    """Vehicles on the road, people, poles, trees and riders beside it, painted far to near."""
    hz, vx = cv.hz, cv.vx
    gh = cv.h - hz
    objs: list[tuple[float, str, float]] = []  # (t, kind, x)
    for _ in range(int(rng.integers(1, 7))):
        tt = rng.uniform(0.12, 1.05)
        u = rng.uniform(-0.85, 0.85)
        objs.append((tt, rng.choice(["car", "truck", "bus"], p=[0.8, 0.1, 0.1]),
                     vx + tt * (u * (road[0] if u < 0 else road[1]))))
    for kind_, n in (("person", int(rng.integers(0, 6))), ("pole", int(rng.integers(1, 5))),
                     ("tree", int(rng.integers(0, 4))), ("rider", int(rng.integers(0, 2)))):
        for _ in range(n):
            tt = rng.uniform(0.15, 1.05)
            left = rng.random() < 0.5
            u = rng.uniform(0.15, 0.9) if kind_ != "rider" else rng.uniform(0.75, 0.95)
            x = (vx - tt * (road[0] + side[0] * u)) if left else (vx + tt * (road[1] + side[1] * u))
            if kind_ == "rider":  # riders use the road edge
                x = (vx - tt * road[0] * u) if left else (vx + tt * road[1] * u)
            objs.append((tt, kind_, x))
    for tt, kind_, x in sorted(objs, key=lambda o: o[0]):
        _paint_object(cv, rng, str(kind_), tt, x, hz + tt * gh, tt * gh)


def _paint_object(cv: _Canvas, rng, kind: str, t: float, x: float, y: float, u: float) -> None:
    """Paint one object standing at row ``y`` (column ``x``); ``u`` = camera height in px."""
    d = 1.0 / t
    i = cv.new_instance()
    if kind in ("car", "truck", "bus"):
        cls = C[kind]
        w, hh = {"car": (1.25, 0.95), "truck": (1.5, 1.9), "bus": (1.65, 2.1)}[kind]
        w, hh = w * u * rng.uniform(0.9, 1.1), hh * u * rng.uniform(0.9, 1.1)
        cv.shadows.append((y, x, 0.12 * u, 0.7 * w))
        if kind == "car":
            cv.rect(y - 0.55 * hh, y - 0.12 * hh, x - w / 2, x + w / 2, cls, i, d)
            cv.rect(y - hh, y - 0.5 * hh, x - 0.33 * w, x + 0.33 * w, cls, i, d)
            cv.ellipse(y - 0.55 * hh, x - 0.33 * w, 0.45 * hh, 0.17 * w, cls, i, d)
            cv.ellipse(y - 0.55 * hh, x + 0.33 * w, 0.45 * hh, 0.17 * w, cls, i, d)
        else:
            cv.rect(y - hh, y - 0.12 * hh, x - w / 2, x + w / 2, cls, i, d)
        for s in (-1, 1):  # wheels
            cv.ellipse(y - 0.12 * hh, x + s * 0.32 * w, 0.12 * hh if kind == "car" else 0.07 * hh,
                       0.1 * w, cls, i, d)
            cv.lights.append((y - 0.35 * hh, x + s * 0.4 * w, 0.06 * u))
    elif kind == "person":
        hh = 1.15 * u * rng.uniform(0.85, 1.1)
        cv.shadows.append((y, x, 0.05 * u, 0.25 * u))
        cv.ellipse(y - 0.36 * hh, x, 0.28 * hh, 0.11 * hh, C["person"], i, d)  # torso + hips
        cv.rect(y - 0.45 * hh, y, x - 0.09 * hh, x + 0.09 * hh, C["person"], i, d)  # legs
        cv.ellipse(y - 0.88 * hh, x, 0.08 * hh, 0.065 * hh, C["person"], i, d)  # head
    elif kind == "rider":
        r = 0.23 * u
        cv.shadows.append((y, x, 0.05 * u, 0.5 * u))
        cv.ellipse(y - 0.95 * u, x, 0.28 * u, 0.11 * u, C["rider"], i, d)
        cv.ellipse(y - 1.3 * u, x, 0.08 * u, 0.07 * u, C["rider"], i, d)
        j = cv.new_instance()
        for s in (-1, 1):
            cv.ring(y - r, x + s * 0.38 * u, r, 0.05 * u, C["bicycle"], j, d * 0.99)
        cv.rect(y - r - 0.03 * u, y - r + 0.03 * u, x - 0.38 * u, x + 0.38 * u, C["bicycle"], j,
                d * 0.99)
        cv.rect(y - 0.75 * u, y - r, x - 0.03 * u, x + 0.03 * u, C["bicycle"], j, d * 0.99)
    elif kind == "pole":
        hh = 3.4 * u * rng.uniform(0.8, 1.2)
        pw = max(0.06 * u, 1.0)
        cv.rect(y - hh, y, x - pw / 2, x + pw / 2, C["pole"], i, d)
        top = rng.random()
        if top < 0.5:
            s, sign = 0.3 * u, cv.new_instance()
            if rng.random() < 0.5:  # round or square sign
                cv.ellipse(y - hh + s / 2, x, s / 2, s / 2, C["traffic sign"], sign, d * 0.99)
            else:
                cv.rect(y - hh, y - hh + s, x - s / 2, x + s / 2, C["traffic sign"], sign, d * 0.99)
        elif top < 0.85:
            cv.rect(y - hh, y - hh + 0.42 * u, x - 0.08 * u, x + 0.08 * u, C["traffic light"],
                    cv.new_instance(), d * 0.99)
            cv.lights.append((y - hh + 0.1 * u, x, 0.07 * u))
        else:
            cv.lights.append((y - hh, x, 0.25 * u))  # street lamp
    elif kind == "tree":
        hh = rng.uniform(2.0, 3.5) * u
        cv.rect(y - 0.6 * hh, y, x - 0.06 * u, x + 0.06 * u, C["vegetation"], i, d)
        cv.ellipse(y - 0.7 * hh, x, 0.35 * hh, rng.uniform(0.5, 0.9) * u, C["vegetation"], i, d)


def _lowfreq(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1] (bicubic upsampling of a coarse random grid)."""
    g = rng.uniform(-1, 1, size=(cells, max(2 * cells, 2))).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _texture(style: DomainStyle, rng, cv: _Canvas) -> np.ndarray:
    """Multiplicative texture field (H, W) around 0 for this domain."""
    h, w = cv.h, cv.w
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    grain = rng.normal(0, 1, size=(h, w)).astype(np.float32)
    tex = 0.3 * grain + 0.5 * _lowfreq(rng, h, w, 6)
    lab = cv.label
    facade = (lab == C["building"]) | (lab == C["wall"])
    scale = np.clip(w / 512 * 8.0 / np.sqrt(cv.depth), 2.0, 40.0)  # feature size shrinks with depth
    if style.texture == "bricks":
        row = np.floor(yy / (scale * 0.5))
        brick = ((np.mod(yy, scale * 0.5) < 1.2) | (np.mod(xx + row * scale * 0.5, scale) < 1.2))
        tex = np.where(facade, tex - 1.5 * brick, tex)
    elif style.texture == "stripes":
        tex = tex + 0.8 * np.sin((xx * 0.9 + yy * 0.4) / (0.25 * scale + 1))
    elif style.texture == "blotches":
        tex = tex + 1.5 * _lowfreq(rng, h, w, 24)
    else:  # grain: strong pixel grain only
        tex = tex + 0.5 * grain
    # Windows on facades (all domains): a grid whose period follows depth.
    win = (np.mod(yy, scale) > 0.45 * scale) & (np.mod(xx, scale * 0.8) > 0.35 * scale)
    tex = np.where(facade & win & (lab == C["building"]), tex - 2.0, tex)
    tex = tex * style.texture_strength
    # Lane markings on the road: a dashed line converging to the vanishing point.
    t = np.clip((yy - cv.hz + 0.5) / (h - cv.hz), 1e-3, None)
    dash = (np.mod(1.0 / t, 1.2) < 0.6) & (np.abs(xx - cv.vx) < t * w * 0.008 + 0.3)
    return np.where(dash & (lab == C["road"]), tex + 1.2, tex)


def _render(style: DomainStyle, colours: np.ndarray, rng, cv: _Canvas) -> np.ndarray:
    """Render the painted scene in ``style`` -> uint8 RGB (H, W, 3)."""
    lab = cv.label
    table = np.zeros((256, 3), dtype=np.float32)
    table[:NUM_CLASSES] = colours
    table[IGNORE] = (25, 25, 28)  # ego hood
    img = table[lab]  # (H, W, 3)
    # Per-instance colour offsets (cars come in many colours; facades vary a little).
    n = max(int(cv.inst.max()) + 1, 1)
    inst_off = rng.normal(0, 1, size=(n, 3)).astype(np.float32)
    inst_off[0] = 0
    jitter = np.zeros((256,), np.float32)
    jitter[:NUM_CLASSES] = _INSTANCE_JITTER
    img += inst_off[cv.inst] * jitter[lab][..., None]
    img /= 255.0
    img *= 1.0 + _texture(style, rng, cv)[..., None]

    img = _illuminate(style, rng, cv, img)
    # Colour grading: saturation, contrast, exposure, tint.
    grey = img.mean(axis=2, keepdims=True)
    img = grey + style.saturation * (img - grey)
    img = 0.5 + style.contrast * (img - 0.5)
    img *= style.brightness * np.asarray(style.tint, np.float32)
    img = _effects(style, rng, cv, img)
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def _illuminate(style: DomainStyle, rng, cv: _Canvas, img: np.ndarray) -> np.ndarray:
    """Illumination: gradient, cast shadows (half-plane over the ground + contact shadows)."""
    h, w, lab = cv.h, cv.w, cv.label
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    img *= (1.0 + style.gradient * (yy / h - 0.5))[..., None]
    if style.shadow > 0:
        ang = rng.uniform(0, np.pi)
        c = rng.uniform(0.2, 0.8) * w
        half = (np.cos(ang) * (xx - c) + np.sin(ang) * (yy - h) * 2.0) > 0
        shade = np.where(half & (cv.depth < 30) & (lab != C["sky"]), style.shadow * 0.6, 0.0)
        contact = np.zeros((h, w), np.float32)
        for cy, cx, ry, rx in cv.shadows:
            y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, h)
            x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, w)
            if y1 > y0 and x1 > x0:
                e = ((yy[y0:y1] - cy) / ry) ** 2 + ((xx[:, x0:x1] - cx) / rx) ** 2
                contact[y0:y1, x0:x1] = np.maximum(contact[y0:y1, x0:x1], (1 - e).clip(0, 1))
        img *= (1.0 - np.maximum(shade, style.shadow * contact))[..., None]
    return img


def _effects(style: DomainStyle, rng, cv: _Canvas, img: np.ndarray) -> np.ndarray:
    """Lamp and headlight glows, fog, rain streaks, blur and sensor noise."""
    h, w = cv.h, cv.w
    if style.lights > 0 and cv.lights:  # lamp and headlight glows
        glow = np.zeros((h, w), np.float32)
        for ly, lx, r in cv.lights:
            cv2.circle(glow, (int(lx), int(ly)), max(int(r), 1), 1.0, -1)
        glow = cv2.GaussianBlur(glow, (0, 0), sigmaX=max(w / 128, 1.0))
        img += style.lights * 2.5 * glow[..., None] * np.array([1.0, 0.9, 0.7], np.float32)
    if style.fog > 0:
        f = 1.0 - np.exp(-style.fog * cv.depth)[..., None]
        img = img * (1 - f) + np.asarray(style.fog_colour, np.float32) * f
    if style.rain > 0:
        drops = (rng.random((h, w)) < 0.004).astype(np.float32)
        k = max(int(w / 40), 3)
        kernel = np.zeros((k, k), np.float32)
        kernel[np.arange(k), np.linspace(0, k // 3, k).astype(int)] = 1.0 / k
        img += style.rain * 3.0 * cv2.filter2D(drops, -1, kernel)[..., None]
    if style.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=style.blur * w / 512)
    if style.noise > 0:
        img += rng.normal(0, style.noise, size=img.shape).astype(np.float32)
    return img


def render_sample(seed: int, domain: int, index: int, size: tuple[int, int] = (256, 512)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic sample -> (RGB uint8 (H, W, 3), trainIds uint8 (H, W)); deterministic."""
    if not 0 <= domain < len(DOMAINS):
        raise ValueError(f"domain {domain} out of range: there are {len(DOMAINS)} domains "
                         f"({', '.join(d.name for d in DOMAINS)})")
    h, w = size
    rng = np.random.default_rng([int(seed), int(domain), int(index)])
    cv = _scene(rng, h, w)
    return _render(DOMAINS[domain], _domain_colours(domain), rng, cv), cv.label


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 else array)
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    path.write_bytes(buf.tobytes())


def _domain_folders(out: Path, d: int, count: int) -> tuple[dict, Path, Path]:
    """Domain d's summary entry and its (created) image and label folders: GTA5's layout for
    domain 0, Cityscapes' val layout for the others."""
    style = DOMAINS[d]
    if d == 0:
        img_dir, lab_dir = out / "gta5" / "images", out / "gta5" / "labels"
        entry = {"name": "gta5", "style": style.name, "layout": "gta5",
                 "path": "gta5", "split": "all", "count": count}
    else:
        city = style.name.removeprefix("synth_")
        img_dir = out / style.name / "leftImg8bit" / "val" / city
        lab_dir = out / style.name / "gtFine" / "val" / city
        entry = {"name": style.name, "style": style.name, "layout": "cityscapes",
                 "path": style.name, "split": "val", "count": count}
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    return entry, img_dir, lab_dir


def _write_frame(d: int, i: int, image: np.ndarray, label: np.ndarray, img_dir: Path, lab_dir: Path) -> None:
    """Frame i of domain d under its dataset's file names (labels as dataset ids)."""
    ids = train_to_cityscapes_ids(label)
    if d == 0:
        _write_png(img_dir / f"{i + 1:05d}.png", image)
        cityscapes_palette_png(ids, lab_dir / f"{i + 1:05d}.png")
    else:
        stem = f"{img_dir.name}_000000_{i:06d}"
        _write_png(img_dir / f"{stem}_leftImg8bit.png", image)
        _write_png(lab_dir / f"{stem}_gtFine_labelIds.png", ids)


def generate(out: str | os.PathLike, *, domains: int = 4, images_per_domain: int = 100,
             size: tuple[int, int] = (256, 512), seed: int = 0, progress: bool = True) -> dict:
    """Write ``domains`` synthetic domains under ``out`` and return the summary (also
    ``out/synth.json``).

    Domain 0 -> ``out/gta5/{images,labels}/NNNNN.png`` (GTA5 layout, palette labels);
    domain d > 0 -> ``out/<name>/{leftImg8bit,gtFine}/val/<city>/...`` (Cityscapes layout).
    """
    if not 1 <= domains <= len(DOMAINS):
        raise ValueError(f"domains={domains}: choose 1..{len(DOMAINS)} "
                         f"({', '.join(d.name for d in DOMAINS)})")
    if images_per_domain < 1 or len(size) != 2 or min(size) < 16:
        raise ValueError(f"images_per_domain must be >= 1 and size (H, W) at least 16 px, "
                         f"got {images_per_domain}, {size}")
    from tqdm import tqdm

    out = Path(out)
    h, w = int(size[0]), int(size[1])
    start = time.time()
    pixels = np.zeros((domains, 256), dtype=np.int64)
    entries = []
    bar = tqdm(total=domains * images_per_domain, desc="synth", unit="img", disable=not progress)
    for d in range(domains):
        entry, img_dir, lab_dir = _domain_folders(out, d, images_per_domain)
        entries.append(entry)
        for i in range(images_per_domain):
            image, label = render_sample(seed, d, i, (h, w))
            pixels[d] += np.bincount(label.ravel(), minlength=256)
            _write_frame(d, i, image, label, img_dir, lab_dir)
            bar.update(1)
    bar.close()
    used = sorted(int(c) for c in np.flatnonzero(pixels[:, :NUM_CLASSES].sum(0)))
    for d, e in enumerate(entries):
        tot = max(int(pixels[d].sum()), 1)
        e["class_fraction"] = {CLASS_NAMES[c]: round(float(pixels[d, c]) / tot, 5) for c in used}
    summary = {"format": FORMAT, "seed": int(seed), "size": [h, w],
               "images_per_domain": int(images_per_domain), "domains": entries,
               "classes": [CLASS_NAMES[c] for c in used], "class_ids": used}
    atomic.write_json(out / "synth.json", summary, indent=1, sort_keys=True)
    if progress:
        print(f"synth: wrote {domains} domains x {images_per_domain} images of {h}x{w} "
              f"({len(used)} classes) to {out} in {time.time() - start:.1f}s")
    return summary
