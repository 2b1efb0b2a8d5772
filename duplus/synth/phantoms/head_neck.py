"""The neck, mandible to thoracic inlet, with a primary tumour and lymph nodes: :class:`HeadNeckAnatomy`.

``_Lesion`` (tumour or node: union of ellipsoids, rough surface, radial PET uptake profile) is
drawn only here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duplus.synth.phantoms.anatomy import _T, Anatomy, _Canvas, _codes, _solid
from duplus.synth.phantoms.geometry import (
    _Column,
    _Deformation,
    _Ellipsoid,
    _Grid,
    _jitter_rotation,
    _smoothstep,
    _Tube,
    _union_bbox,
    _WorldField,
)


@dataclass
class _Lesion:
    """Tumour or lymph node: union of ellipsoids, a rough surface and a radial uptake profile."""

    parts: list[_Ellipsoid]
    suv_max: float
    necrosis: float = 0.0  # level below which the core is necrotic (0 = none)
    waves: np.ndarray | None = None  # (n, 4): wave vector (1/mm) and phase, surface roughness
    roughness_mm: float = 0.0

    def bbox(self):
        lo, hi = _union_bbox(*[e.bbox() for e in self.parts])
        return lo - self.roughness_mm, hi + self.roughness_mm

    def bounding_radius(self) -> float:
        c = self.parts[0].center
        return max(float(np.linalg.norm(e.center - c) + e.radii.max()) for e in self.parts) + self.roughness_mm

    def level(self, q):
        if self.waves is not None:
            # irregular margin: shift each coordinate by a few random sinusoids (<= roughness_mm)
            amp = np.float32(self.roughness_mm / len(self.waves))
            shifted = []
            for w in range(3):
                s = q[w]
                for k in self.waves:
                    s = s + amp * np.sin(k[0] * q[0] + k[1] * q[1] + k[2] * q[2] + np.float32(k[3] + 2.1 * w))
                shifted.append(s)
            q = shifted
        levels = [e.level(q) for e in self.parts]
        return np.minimum.reduce(levels) if len(levels) > 1 else levels[0]

    def shape_fn(self, code: int):
        def fn(q):
            lev = self.level(q)
            inside = lev <= 1.0
            out = _codes(inside, code)
            # hotter centre: SUVmax at the core falling to 40 % at the margin
            uptake = np.where(inside, np.float32(self.suv_max) * (1.0 - 0.6 * lev), np.float32(0.0)).astype(np.float32)
            if self.necrosis > 0:
                core = inside & (lev <= self.necrosis)
                out[core] = _T.NECROSIS
                uptake[core] = 0.0
            return out, uptake

        return fn


def _random_waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> np.ndarray:
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = direction * (2 * np.pi / rng.uniform(*wavelength, size=(n, 1)))
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, (n, 1))], axis=1).astype(np.float32)


class HeadNeckAnatomy(Anatomy):
    """Neck from the mandible to the thoracic inlet with an oropharyngeal/laryngeal primary."""

    region = "head_neck"

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        g = u(0.9, 1.1)
        self.g = g
        self.height = u(140.0, 180.0)
        self.top, self.bottom = self.height / 2, -self.height / 2
        self.a = 72.0 * g * u(0.92, 1.08)
        self.b_ant = 62.0 * g * u(0.92, 1.08)
        self.b_post = self.b_ant * u(0.95, 1.05)
        self.p_body = u(2.0, 2.4)
        self.fat = u(4.0, 9.0)
        self.jaw_grow = (u(0.2, 0.35), u(0.05, 0.12))  # anterior / lateral widening at the jaw

        # spine and airway
        self.vb_y = u(-8.0, -2.0) * g
        self.vb_r = (u(14.0, 17.0) * g, u(11.0, 13.0) * g)
        self.canal_r = u(7.0, 8.5) * g
        self.canal_y = self.vb_y - self.vb_r[1] - self.canal_r - 1.5
        self.disc_period = u(17.0, 21.0) * g
        self.disc_phase = u(0.0, self.disc_period)
        self.airway_y = (u(30.0, 36.0) * g, u(18.0, 22.0) * g)  # bottom (trachea), top (oropharynx)
        self.airway_r = ((u(8.0, 10.0), u(7.0, 9.0)), (u(8.0, 10.0), u(8.0, 10.0)), (u(12.0, 16.0), u(6.0, 9.0)))

        # vessels: carotid medial, jugular lateral (bottom -> top)
        self.carotid = ((u(18.0, 22.0) * g, 12.0 * g), (u(27.0, 32.0) * g, 8.0 * g), u(3.0, 4.0))
        self.jugular = ((u(27.0, 31.0) * g, 13.0 * g), (u(37.0, 42.0) * g, 2.0 * g), u(5.0, 6.5))

        # mandible at the top of the field of view
        self.jaw = (u(0.0, 8.0) * g, u(44.0, 50.0) * g, u(48.0, 56.0) * g, u(8.0, 10.0), self.top - u(30.0, 38.0))

        # primary tumour: union of 2-3 ellipsoids by the airway, rough surface
        self.site = "oropharynx" if rng.random() < 0.6 else "larynx"
        self.side = 1.0 if rng.random() < 0.5 else -1.0
        if self.site == "oropharynx":
            zt = self.top - u(40.0, 58.0)
            center = np.array([self.side * u(6.0, 14.0), self._airway_y(zt) + u(-6.0, 4.0), zt])
        else:
            zt = u(-20.0, 12.0)
            center = np.array([self.side * u(4.0, 10.0), self._airway_y(zt) + u(-2.0, 6.0), zt])
        main = _Ellipsoid(center, rng.uniform(10.0, 20.0, 3), _jitter_rotation(rng, max_deg=30.0))
        parts = [main]
        for _ in range(int(rng.integers(1, 3))):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            offset = direction * main.radii.mean() * u(0.45, 0.75)
            parts.append(
                _Ellipsoid(
                    center + offset, main.radii * rng.uniform(0.45, 0.75, 3), _jitter_rotation(rng, max_deg=40.0)
                )
            )
        self.tumour = _Lesion(
            parts, suv_max=u(6.0, 15.0), waves=_random_waves(rng, 3, (14.0, 30.0)), roughness_mm=u(1.5, 3.0)
        )

        # lymph nodes: levels II-III, ipsilateral more often, never touching the tumour
        self.nodes: list[_Lesion] = []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(60):
                side = self.side if rng.random() < 0.7 else -self.side
                zn = self.top - u(35.0, 70.0) if rng.random() < 0.6 else u(-30.0, 10.0)
                r = u(7.0, 14.0)
                radii = np.array([r, r * u(0.7, 1.0), r * u(0.8, 1.2)])
                jx, jy = self._vessel_xy(self.jugular, zn)
                x = side * min(jx + self.jugular[2] + u(-2.0, 8.0), self.a - self.fat - radii.max() - 6.0)
                node = _Ellipsoid((x, jy + u(-4.0, 14.0), zn), radii, _jitter_rotation(rng, max_deg=25.0))
                cand = _Lesion(
                    [node], suv_max=u(3.0, 9.0), necrosis=u(0.15, 0.35) if (r > 10.0 and rng.random() < 0.35) else 0.0
                )
                if (
                    self._separate(cand, [self.tumour, *self.nodes], gap=4.0)
                    and self.bottom + r + 8 < zn < self.top - r - 8
                ):
                    self.nodes.append(cand)
                    break
        if not self.nodes:  # every case has at least one node: a small contralateral level III node
            zn = self.bottom + 0.4 * self.height
            jx, jy = self._vessel_xy(self.jugular, zn)
            node = _Ellipsoid(
                (-self.side * (jx + self.jugular[2] + 4.0), jy + 6.0, zn), np.array([7.0, 6.0, 8.0]), np.eye(3)
            )
            self.nodes.append(_Lesion([node], suv_max=u(3.0, 9.0)))

        margin = u(8.0, 20.0)
        self.lo = np.array([-self.a * (1 + self.jaw_grow[1]) - margin, -self.b_post - margin, self.bottom])
        self.hi = np.array(
            [self.a * (1 + self.jaw_grow[1]) + margin, self.b_ant * (1 + self.jaw_grow[0]) + margin, self.top]
        )
        self.glands = {
            "submandibular": [
                _Ellipsoid(
                    (sg * u(30.0, 38.0) * g, self.jaw[0] + u(15.0, 25.0), self.top - u(34.0, 42.0)),
                    np.array([13.0, 10.0, 11.0]) * g,
                    _jitter_rotation(rng),
                )
                for sg in (1, -1)
            ],
            "parotid": [
                _Ellipsoid(
                    (sg * u(52.0, 58.0) * g, u(-10.0, 0.0), self.top - u(0.0, 10.0)),
                    np.array([11.0, 17.0, 22.0]) * g,
                    _jitter_rotation(rng),
                )
                for sg in (1, -1)
            ],
        }
        th_z = self.bottom + u(22.0, 32.0)
        ty = self.airway_y[0]
        self.thyroid = [
            _Ellipsoid(
                (sg * u(16.0, 20.0) * g, ty + 2.0, th_z),
                np.array([8.0, 9.0, 20.0]) * g * u(0.85, 1.2),
                _jitter_rotation(rng),
            )
            for sg in (1, -1)
        ]
        self.thyroid.append(_Ellipsoid((0.0, ty + 12.0 * g, th_z - 8.0), np.array([14.0, 4.0, 7.0]) * g))

        self.deformation = _Deformation(rng, self.lo, self.hi, amplitude=u(2.0, 4.0), step=u(40.0, 60.0))
        self.texture = _WorldField.random(rng, self.lo, self.hi, step=u(3.0, 5.0))
        self.fat_planes = _WorldField.random(rng, self.lo, self.hi, step=u(6.0, 9.0))

    # helpers ---------------------------------------------------------------------------
    def _airway_y(self, z):
        t = (np.asarray(z, float) - self.bottom) / self.height
        return self.airway_y[0] + (self.airway_y[1] - self.airway_y[0]) * t

    def _vessel_xy(self, vessel, z) -> tuple[float, float]:
        (xb, yb), (xt, yt), _ = vessel
        t = float(np.clip((z - self.bottom) / self.height, 0.0, 1.0))
        return xb + (xt - xb) * t, yb + (yt - yb) * t

    @staticmethod
    def _separate(cand: _Lesion, others: list[_Lesion], gap: float) -> bool:
        c = cand.parts[0].center
        return all(
            min(float(np.linalg.norm(c - e.center)) - float(e.radii.max()) for e in o.parts) - cand.bounding_radius()
            > gap
            for o in others
        )

    def _body_level(self, p, shrink: float) -> np.ndarray:
        jaw = _smoothstep((p[2] - (self.top - 65.0)) / 40.0)
        e = np.float32(self.p_body)
        ax = np.float32(self.a - shrink) * (1.0 + np.float32(self.jaw_grow[1]) * jaw)
        by_ant = np.float32(self.b_ant - shrink) * (1.0 + np.float32(self.jaw_grow[0]) * jaw)
        by = np.where(p[1] > 0, by_ant, np.float32(self.b_post - shrink))
        return (np.abs(p[0]) / ax) ** e + (np.abs(p[1]) / by) ** e

    def paint(self, canvas: _Canvas) -> None:
        grid = canvas.grid
        full = grid.full()
        _, _, inner = self._outline(canvas)
        labels = self.labels
        zlo, zhi = self.bottom - 30.0, self.top + 30.0

        canvas.paint(self.tumour.bbox(), self.tumour.shape_fn(_T.TUMOUR), labels["primary tumour"], within=inner)
        for node in self.nodes:
            canvas.paint(node.bbox(), node.shape_fn(_T.NODE), labels["lymph node"], within=inner)

        # airway lumen with a mucosal / constrictor lining; oesophagus behind the trachea
        (rb, rm, rt) = self.airway_r
        zs = [zlo, self.bottom + 0.45 * self.height, zhi]
        ys = [float(self._airway_y(z)) for z in zs]
        airway = _Column(zs, [0.0] * 3, ys, [rb[0], rm[0], rt[0]], [rb[1], rm[1], rt[1]])
        lining = _Column(zs, [0.0] * 3, ys, [rb[0] + 3, rm[0] + 3, rt[0] + 4], [rb[1] + 3, rm[1] + 3, rt[1] + 4])

        def airway_fn(q):
            out = _codes(lining.level(q) <= 1.0, _T.MUCOSA)
            out[airway.level(q) <= 1.0] = _T.AIRWAY
            return out

        canvas.paint(lining.bbox(), airway_fn, within=inner)
        oes_y = self.vb_y + self.vb_r[1] + 7.0
        oesophagus = _Column(
            [zlo, self.bottom + 0.5 * self.height], [-3.0, -3.0], [oes_y, oes_y], [8.0, 8.0], [5.5, 5.5]
        )
        canvas.paint(oesophagus.bbox(), _solid(oesophagus, _T.MUCOSA), within=inner)

        # cervical spine
        vb, shell = self._vertebral_body(zlo, zhi, cortex_mm=2.0)
        cy, cr = np.float32(self.canal_y), np.float32(self.canal_r)

        def spine(q):
            lev = vb.level(q)
            in_disc = np.mod(q[2] - self.disc_phase, self.disc_period) < 5.0 * self.g
            out = _codes(lev <= 1.0, _T.CANCELLOUS_BONE)
            out[(lev <= 1.0) & (lev > shell)] = _T.CORTICAL_BONE
            out[(lev <= 1.0) & in_disc] = _T.DISC
            r = np.sqrt(q[0] ** 2 + (q[1] - cy) ** 2)
            out[r <= cr] = _T.CSF
            out[r <= cr * 0.6] = _T.CORD
            ring = (r > cr) & (r <= cr + 5.5) & (q[1] < cy + 0.7 * cr)
            spinous = (np.abs(q[0]) < 3.5) & (q[1] < cy) & (q[1] > cy - cr - 22.0 * self.g)
            lateral = (np.abs(q[1] - self.vb_y + 2.0) < 3.0) & (np.abs(q[0]) < self.vb_r[0] + 11.0 * self.g) & ~in_disc
            arch = np.mod(q[2] - self.disc_phase + 0.2 * self.disc_period, self.disc_period) < 0.7 * self.disc_period
            ring &= arch
            spinous &= arch
            out[(out == 0) & (ring | spinous | lateral)] = _T.CORTICAL_BONE
            return out

        canvas.paint(([-45.0, cy - cr - 30.0, zlo], [45.0, self.vb_y + self.vb_r[1], zhi]), spine, within=inner)

        # mandible: U-shaped bone slab open posteriorly, marrow inside a cortical shell
        jy, jax, jay, jt, jz = self.jaw
        mean_r = (jax + jay) / 2

        def mandible(q):
            rho = np.sqrt((q[0] / jax) ** 2 + ((q[1] - jy) / jay) ** 2)
            dist = np.abs(rho - 1.0) * mean_r
            slab = (q[2] > jz) & (q[2] < self.top - 3.0) & (q[1] > jy - 14.0)
            out = _codes(slab & (dist < jt / 2), _T.CORTICAL_BONE)
            out[slab & (dist < jt / 2 - 2.0)] = _T.CANCELLOUS_BONE
            return out

        canvas.paint(([-jax - jt, jy - 20.0, jz], [jax + jt, jy + jay + jt, zhi]), mandible, within=inner)

        # vessels (contrast-enhanced carotids, jugular veins)
        for sign in (1.0, -1.0):
            for vessel, code in ((self.carotid, _T.ARTERY), (self.jugular, _T.VEIN)):
                (xb, yb), (xt, yt), r = vessel
                tube = _Tube([[sign * xb, yb, zlo], [sign * xt, yt, zhi]], [r, r])
                canvas.paint(tube.bbox(), _solid(tube, code), within=inner)

        for gland in self.thyroid:
            canvas.paint(gland.bbox(), _solid(gland, _T.THYROID), within=inner)
        for name, code in (("submandibular", _T.SUBMANDIBULAR), ("parotid", _T.PAROTID)):
            for gland in self.glands[name]:
                canvas.paint(gland.bbox(), _solid(gland, code), within=inner)

        # muscles: sternocleidomastoids, posterior and prevertebral muscles, tongue, straps
        muscles = [
            _Tube(
                [
                    [sign * 54.0 * self.g, -8.0 * self.g, self.top + 10.0],
                    [sign * 24.0 * self.g, 42.0 * self.g, self.bottom - 10.0],
                ],
                [9.0 * self.g, 7.5 * self.g],
            )
            for sign in (1.0, -1.0)
        ]
        muscles.append(
            _Column(
                [zlo, zhi],
                [0.0, 0.0],
                [self.canal_y - 12.0 * self.g] * 2,
                [self.a * 0.72] * 2,
                [self.b_post * 0.38] * 2,
            )
        )
        for sign in (1.0, -1.0):  # scalenes (lateral to the spine, diverging caudally) and levator scapulae
            sx = self.vb_r[0] + 14.0 * self.g
            muscles.append(
                _Column([zlo, zhi], [sign * (sx + 14.0), sign * sx], [self.vb_y - 4.0] * 2, [10.0, 8.0], [7.0, 6.0])
            )
            muscles.append(
                _Column(
                    [zlo, zhi],
                    [sign * 46.0 * self.g, sign * 40.0 * self.g],
                    [self.canal_y - 4.0] * 2,
                    [11.0, 9.0],
                    [9.0, 8.0],
                )
            )
        muscles += [
            _Column([zlo, zhi], [sign * 9.0] * 2, [self.vb_y + self.vb_r[1] + 2.0] * 2, [6.0, 6.0], [3.5, 3.5])
            for sign in (1.0, -1.0)
        ]
        muscles.append(_Ellipsoid((0.0, jy + 12.0, self.top - 12.0), np.array([30.0, 32.0, 24.0]) * self.g))
        muscles.append(
            _Column([zlo, self.top - 50.0], [0.0, 0.0], [self.airway_y[0] + 17.0] * 2, [24.0, 24.0], [4.0, 4.0])
        )
        for m in muscles:
            canvas.paint(m.bbox(), _solid(m, _T.MUSCLE), within=inner)

        # remaining interior: fat planes between muscle bundles
        free = inner & ~canvas.occupied
        planes = self.fat_planes.sample(grid, full)
        canvas.tissue[free & (planes > 1.3)] = _T.MUSCLE

    def _lesion_volume_ml(self, lesion: _Lesion) -> float:
        """Volume on a fixed 1 mm world grid, so the factor is the same for every acquisition."""
        lo, hi = lesion.bbox()
        margin = self.deformation.amplitude + 1.0
        grid = _Grid(lo - margin, hi + margin, (1.0, 1.0, 1.0), (0, 1, 2), (False, False, False))
        canvas = _Canvas(grid, self.deformation)
        canvas.paint(lesion.bbox(), lesion.shape_fn(_T.TUMOUR), 1)
        return float(canvas.label.sum()) * grid.voxel_ml

    def factors(self, canvas: _Canvas) -> dict:
        node_volumes = [self._lesion_volume_ml(n) for n in self.nodes]
        sides = {("right" if n.parts[0].center[0] > 0 else "left") for n in self.nodes}
        return {
            "tumour_site": self.site,
            "tumour_side": "right" if self.side > 0 else "left",
            "tumour_volume_ml": round(self._lesion_volume_ml(self.tumour), 2),
            "suv_max": round(self.tumour.suv_max, 2),
            "node_count": len(self.nodes),
            "node_volume_ml": round(sum(node_volumes), 2),
            "node_suv_max": round(max((n.suv_max for n in self.nodes), default=0.0), 2),
            "node_sides": "bilateral" if len(sides) > 1 else (sides.pop() if sides else "none"),
            "necrotic_nodes": sum(1 for n in self.nodes if n.necrosis > 0),
        }
