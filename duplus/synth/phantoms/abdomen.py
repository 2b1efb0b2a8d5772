"""The upper abdomen (liver dome to lower renal poles): :class:`AbdomenAnatomy`."""

from __future__ import annotations

import math

import numpy as np

from duplus.synth.phantoms.anatomy import _T, Anatomy, _Canvas, _codes, _solid
from duplus.synth.phantoms.geometry import (
    _Column,
    _Deformation,
    _Ellipsoid,
    _jitter_rotation,
    _Tube,
    _union_bbox,
    _WorldField,
)


class AbdomenAnatomy(Anatomy):
    """Upper abdomen from the liver dome to the lower renal poles."""

    region = "abdomen"

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        g = u(0.9, 1.1)
        self.g = g
        # body wall: super-ellipse, flatter at the back; the fat layer adds to a cavity sized by g
        self.fat = u(10.0, 25.0)
        self.muscle = u(8.0, 14.0)
        wall = self.fat + self.muscle
        self.a = 131.0 * g * u(0.94, 1.06) + wall
        self.b_ant = 86.0 * g * u(0.92, 1.08) + wall
        self.b_post = (self.b_ant - wall) * u(0.88, 0.98) + wall
        self.p_body = u(2.2, 2.8)
        self.z_wobble = (u(0.0, 0.04), u(150.0, 300.0), u(0, 2 * math.pi))

        # spine
        self.vb_y = -self.b_post + self.fat + u(52.0, 62.0) * g
        self.vb_r = (u(20.0, 24.0) * g, u(15.0, 18.0) * g)
        self.canal_r = u(8.0, 10.0) * g
        self.canal_y = self.vb_y - self.vb_r[1] - self.canal_r - 2.0
        self.disc_period = u(32.0, 38.0) * g
        self.disc_phase = u(0.0, self.disc_period)
        self.disc_t = u(7.0, 10.0) * g

        # kidneys (left higher than right)
        z_kr = -40.0 * g + u(-8.0, 8.0)
        z_kl = z_kr + u(10.0, 25.0)
        self.kidneys = {}
        for side, z in (("left", z_kl), ("right", z_kr)):
            sign = -1.0 if side == "left" else 1.0  # RAS+: the subject's left is -x
            s = u(0.93, 1.1) * g
            center = (sign * u(65.0, 80.0) * g, self.vb_y - u(2.0, 10.0), z)
            # upper pole medial (about y) and posterior (about x); hilum faces antero-medially (about z)
            rot = _jitter_rotation(rng, (u(8.0, 14.0), -sign * u(10.0, 18.0), -sign * u(20.0, 35.0)))
            body = _Ellipsoid(center, (28.5 * s, 23.0 * s, 56.0 * s), rot)
            self.kidneys[side] = (body, -sign, u(-1.0, 1.0, 2))  # medial direction in local x, pyramid phase

        # aorta (left of midline) and IVC (right)
        self.aorta_r = u(11.0, 14.0)
        ax = -u(8.0, 16.0) * g
        ay = self.vb_y + self.vb_r[1] + self.aorta_r + u(1.0, 4.0)
        self.aorta_xy = (ax, ay)
        self.aorta_wobble = rng.uniform(-3.0, 3.0, (3, 2))
        self.ivc = (u(18.0, 26.0) * g, self.vb_y + self.vb_r[1] + u(4.0, 10.0), u(10.0, 14.0) * g, u(7.0, 10.0) * g)

        # liver: right lobe super-ellipsoid + left lobe, portal vessels inside
        s = u(0.93, 1.07) * math.sqrt(g)  # liver volume ~ g^1.5: keeps 1.0-2.3 l
        rl_center = np.array([u(50.0, 62.0) * g, u(-4.0, 10.0) * g, z_kr + u(45.0, 58.0) * g])
        self.liver_right = _Ellipsoid(
            rl_center, np.array([71.0, 81.0, 69.0]) * s, _jitter_rotation(rng), power=u(2.0, 2.3)
        )
        ll_center = rl_center + np.array([-u(68.0, 82.0) * g, u(38.0, 50.0) * g, u(8.0, 18.0)])
        self.liver_left = _Ellipsoid(
            ll_center, np.array([52.0, 25.0, 34.0]) * s, _jitter_rotation(rng, (0.0, 0.0, -15.0))
        )
        porta = rl_center + np.array([-30.0, 8.0, -30.0]) * g
        self.liver_vessels = [
            _Tube([porta, porta + np.array([45.0, -10.0, 30.0]) * g], [6.0, 3.0]),
            _Tube([porta, porta + np.array([-55.0, 35.0, 20.0]) * g], [5.5, 3.0]),
            _Tube([porta, porta + np.array([15.0, -25.0, 55.0]) * g], [5.0, 3.0]),
        ]
        self.gallbladder = None
        if rng.random() < 0.7:
            gb_center = rl_center + np.array([-u(25.0, 40.0), u(35.0, 48.0), -u(45.0, 58.0)]) * g
            self.gallbladder = _Ellipsoid(
                gb_center,
                np.array([14.0, 14.0, 32.0]) * u(0.8, 1.15) * g,
                _jitter_rotation(rng, (-30.0, 0.0, 0.0), 15.0),
            )

        # spleen: postero-lateral left, long axis tilted, concave medial face
        s = u(0.92, 1.15) * g
        sp_center = np.array([-u(88.0, 102.0) * g, -u(22.0, 38.0) * g, z_kl + u(42.0, 55.0) * g])
        sp_rot = _jitter_rotation(rng, (u(18.0, 30.0), 0.0, u(30.0, 45.0)))
        self.spleen = _Ellipsoid(sp_center, np.array([22.0, 40.0, 55.0]) * s, sp_rot)
        cut_center = sp_center + sp_rot @ np.array([22.0 * s * 1.25, 0.0, 0.0])
        self.spleen_cut = _Ellipsoid(cut_center, np.array([22.0 * 0.9, 40.0 * 0.85, 55.0 * 0.85]) * s, sp_rot)

        # pancreas: head right of midline by the IVC, body arching over the aorta, tail to the spleen
        kl_center = self.kidneys["left"][0].center
        z_p = z_kr + u(20.0, 35.0) * g
        head = np.array([self.ivc[0] + u(-4.0, 6.0), ay + self.aorta_r + u(14.0, 22.0), z_p])
        tail = np.array([kl_center[0] - u(5.0, 20.0) * g, kl_center[1] + 22.5 + u(12.0, 22.0), z_p + u(18.0, 32.0) * g])
        ctrl = np.array([ax, ay + self.aorta_r + u(22.0, 32.0), z_p + 10.0])
        t = np.linspace(0.0, 1.0, 6)[:, None]
        pts = (1 - t) ** 2 * head + 2 * (1 - t) * t * ctrl + t**2 * tail
        s = u(0.88, 1.12) * g
        radii = np.linspace(15.0, 8.5, 6) * s
        uncinate = head + np.array([u(0.0, 6.0), -u(4.0, 10.0), -u(18.0, 26.0)]) * g
        self.pancreas = [_Tube(pts, radii), _Tube([head, uncinate], [14.0 * s, 11.0 * s])]

        # stomach: fundus, body and antrum, air-fluid level (supine: gas anterior)
        s = u(0.85, 1.15) * g
        top = rl_center[2] + self.liver_right.radii[2]
        fundus = np.array([-u(50.0, 62.0) * g, u(0.0, 15.0) * g, top - u(24.0, 36.0)])
        body_c = fundus + np.array([u(0.0, 10.0), u(22.0, 32.0), -u(35.0, 45.0)]) * g
        antrum = np.array([-u(0.0, 15.0) * g, u(42.0, 55.0) * g, body_c[2] - u(30.0, 42.0) * g])
        self.stomach = [
            _Ellipsoid(fundus, np.array([32.0, 30.0, 32.0]) * s, _jitter_rotation(rng)),
            _Ellipsoid(body_c, np.array([36.0, 28.0, 45.0]) * s, _jitter_rotation(rng, (-20.0, 0.0, 0.0))),
            _Ellipsoid(antrum, np.array([34.0, 22.0, 22.0]) * s, _jitter_rotation(rng, (0.0, 0.0, 20.0))),
            # lower body bending into the antrum keeps the stomach in one piece
            _Ellipsoid((body_c + antrum) / 2, np.array([30.0, 24.0, 30.0]) * s, _jitter_rotation(rng)),
        ]
        self.stomach_wall = u(3.0, 6.0)
        self.gas_level = body_c[1] + u(0.1, 0.6) * 28.0 * s

        # field of view: liver dome / spleen top to the lower renal poles
        tops = [e.center[2] + e.radii[2] for e in (self.liver_right, self.liver_left, self.spleen, self.stomach[0])]
        bottoms = [k[0].center[2] - k[0].radii[2] for k in self.kidneys.values()]
        z_top = max(tops) + u(5.0, 15.0)
        z_bottom = min(bottoms) - u(5.0, 15.0)
        margin = u(8.0, 20.0)
        self.lo = np.array([-self.a - margin, -self.b_post - margin, z_bottom])
        self.hi = np.array([self.a + margin, self.b_ant + margin, z_top])

        # lungs: bases reach into the top slices, postero-lateral recesses
        self.lungs = [
            _Ellipsoid(
                (sign * u(70.0, 85.0) * g, -u(15.0, 30.0) * g, z_top + u(35.0, 50.0)),
                np.array([68.0, 72.0, 75.0]) * g,
                _jitter_rotation(rng),
            )
            for sign in (1.0, -1.0)
        ]
        self.rib_period = u(28.0, 34.0) * g
        self.rib_phase = u(0.0, self.rib_period)
        self.rib_extent = u(90.0, 130.0)
        self.psoas_x = self.vb_r[0] + u(12.0, 18.0) * g

        # smooth random fields
        self.deformation = _Deformation(rng, self.lo, self.hi, amplitude=u(2.0, 6.0), step=u(45.0, 70.0))
        self.texture = _WorldField.random(rng, self.lo, self.hi, step=u(4.0, 6.0))
        self.bowel = _WorldField.random(rng, self.lo, self.hi, step=u(9.0, 13.0))
        self.bowel_threshold = u(-0.3, 0.3)

    # body outline -----------------------------------------------------------------------
    def _body_level(self, p, shrink: float) -> np.ndarray:
        amp, period, phase = self.z_wobble
        zf = 1.0 + amp * np.sin(2 * np.pi * p[2] / period + phase)
        e = np.float32(self.p_body)
        bx = np.abs(p[0]) / (np.float32(self.a - shrink) * zf)
        by = np.abs(p[1]) / (np.where(p[1] > 0, np.float32(self.b_ant - shrink), np.float32(self.b_post - shrink)) * zf)
        return bx**e + by**e

    def paint(self, canvas: _Canvas) -> None:
        grid = canvas.grid
        full = grid.full()
        p, body, inner = self._outline(canvas)
        cavity = self._body_level(p, self.fat + self.muscle) <= 1.0
        # the posterior paraspinal compartment belongs to the spine and back muscles
        cavity &= ~((p[1] < np.float32(self.vb_y)) & (np.abs(p[0]) < np.float32(38.0 * self.g)))
        canvas.tissue[inner] = _T.MUSCLE
        canvas.tissue[cavity] = _T.VISCERAL_FAT
        wall = inner & ~cavity
        del inner
        labels = self.labels
        big = 1e4
        zlo, zhi = self.lo[2] - 30.0, self.hi[2] + 30.0

        # spine: vertebral bodies with discs, canal, cord, posterior elements
        vb, shell = self._vertebral_body(zlo, zhi, cortex_mm=2.5)
        canal = _Column([zlo, zhi], [0.0, 0.0], [self.canal_y] * 2, [self.canal_r] * 2, [self.canal_r] * 2)
        cy, cr = np.float32(self.canal_y), np.float32(self.canal_r)

        def spine(q):
            lev = vb.level(q)
            in_disc = np.mod(q[2] - self.disc_phase, self.disc_period) < self.disc_t
            out = _codes(lev <= 1.0, _T.CANCELLOUS_BONE)
            out[(lev <= 1.0) & (lev > shell)] = _T.CORTICAL_BONE
            out[(lev <= 1.0) & in_disc] = _T.DISC
            c = canal.level(q)
            out[c <= 1.0] = _T.CSF
            out[c <= 0.3] = _T.CORD
            r = np.sqrt(q[0] ** 2 + (q[1] - cy) ** 2)
            ring = (r > cr) & (r <= cr + 7.0) & (q[1] < cy + 0.5 * cr)
            spinous = (np.abs(q[0]) < 4.5) & (q[1] < cy) & (q[1] > cy - cr - 32.0 * self.g)
            level_in_vertebra = np.mod(q[2] - self.disc_phase, self.disc_period)
            # each vertebra's arch covers ~70 % of its height: gaps between laminae / spinous processes
            arch = np.mod(level_in_vertebra + 0.2 * self.disc_period, self.disc_period) < 0.7 * self.disc_period
            ring &= arch
            spinous &= arch
            transverse = (
                (np.abs(q[1] - cy - 4.0) < 3.5)
                & (np.abs(q[0]) < 32.0 * self.g)
                & (level_in_vertebra > self.disc_period - 12.0)
            )
            out[(out == 0) & (ring | spinous | transverse)] = _T.CORTICAL_BONE
            return out

        spine_box = ([-45.0 * self.g, cy - cr - 40.0 * self.g, zlo], [45.0 * self.g, self.vb_y + self.vb_r[1], zhi])
        canvas.paint(spine_box, spine, within=body)

        # muscles: psoas (growing caudally) and erector spinae
        zc = (self.lo[2] + self.hi[2]) / 2
        for sign in (1.0, -1.0):
            psoas = _Column(
                [zlo, zc + 20.0, zhi],
                [sign * self.psoas_x] * 3,
                [self.vb_y + 2.0] * 3,
                [20.0 * self.g, 9.0 * self.g, 3.0],
                [18.0 * self.g, 8.0 * self.g, 3.0],
            )
            canvas.paint(psoas.bbox(), _solid(psoas, _T.MUSCLE), within=body)
            erector = _Column(
                [zlo, zhi],
                [sign * 30.0 * self.g] * 2,
                [self.canal_y - 16.0 * self.g] * 2,
                [24.0 * self.g] * 2,
                [20.0 * self.g] * 2,
            )
            canvas.paint(erector.bbox(), _solid(erector, _T.MUSCLE), within=body)

        # great vessels
        ax, ay = self.aorta_xy
        wob = self.aorta_wobble
        aorta = _Column(
            [zlo, (zlo + zhi) / 2, zhi], ax + wob[:, 0], ay + wob[:, 1], [self.aorta_r] * 3, [self.aorta_r] * 3
        )
        canvas.paint(aorta.bbox(), _solid(aorta, _T.AORTA), labels["aorta"], within=body)
        ix, iy, irx, iry = self.ivc
        ivc = _Column([zlo, zhi], [ix, ix], [iy, iy], [irx, irx], [iry, iry])
        canvas.paint(ivc.bbox(), _solid(ivc, _T.IVC), within=cavity)

        # kidneys: cortex, medullary pyramids, renal sinus fat at the hilum (unlabelled)
        for side in ("left", "right"):
            kid, medial, phase = self.kidneys[side]

            def kidney(q, sinus: bool, kid=kid, medial=medial, phase=phase):
                loc = kid.local(q)
                lev = loc[0] ** 2 + loc[1] ** 2 + loc[2] ** 2
                hilum = ((loc[0] - medial) ** 2 / 0.3 + loc[1] ** 2 / 0.3 + loc[2] ** 2 / 0.12 <= 1.0) & (lev <= 1.15)
                if sinus:
                    return _codes(hilum, _T.VISCERAL_FAT)
                out = _codes((lev <= 1.0) & ~hilum, _T.KIDNEY_CORTEX)
                pyramids = np.sin(5.0 * np.arctan2(loc[2], loc[0] * medial) + phase[0]) > -0.4
                out[(lev <= 0.55) & pyramids & ~hilum] = _T.KIDNEY_MEDULLA
                return out

            lo, hi = kid.bbox()
            canvas.paint((lo - 5.0, hi + 5.0), lambda q, fn=kidney: fn(q, True), within=cavity)
            canvas.paint((lo, hi), lambda q, fn=kidney: fn(q, False), labels[f"{side} kidney"], within=cavity)

        if self.gallbladder is not None:
            gb = self.gallbladder
            canvas.paint(gb.bbox(), _solid(gb, _T.GALLBLADDER), within=cavity)

        # pancreas
        pan = self.pancreas

        def pancreas(q):
            return _codes(np.minimum(pan[0].level(q), pan[1].level(q)) <= 1.0, _T.PANCREAS)

        canvas.paint(_union_bbox(pan[0].bbox(), pan[1].bbox()), pancreas, labels["pancreas"], within=cavity)

        # liver with portal / hepatic vessels (labelled as liver, as in public datasets)
        lr, ll, vessels = self.liver_right, self.liver_left, self.liver_vessels

        def liver(q):
            return _codes((lr.level(q) <= 1.0) | (ll.level(q) <= 1.0), _T.LIVER)

        def liver_vessel(q, v):
            return _codes((v.level(q) <= 1.0) & (liver(q) > 0), _T.HEPATIC_VESSEL)

        for v in vessels:  # evaluated in each vessel's own box: far fewer voxels than the liver's
            canvas.paint(v.bbox(), lambda q, v=v: liver_vessel(q, v), labels["liver"], within=cavity)
        canvas.paint(_union_bbox(lr.bbox(), ll.bbox()), liver, labels["liver"], within=cavity)

        sp, cut = self.spleen, self.spleen_cut
        canvas.paint(
            sp.bbox(),
            lambda q: _codes((sp.level(q) <= 1.0) & (cut.level(q) > 1.0), _T.SPLEEN),
            labels["spleen"],
            within=cavity,
        )

        # stomach: wall, fluid and an anterior gas cap
        st, wall_t, gas_y = self.stomach, self.stomach_wall, np.float32(self.gas_level)
        inner_st = [_Ellipsoid(e.center, e.radii - wall_t, e.rot) for e in st]

        def stomach(q):
            outer = np.minimum.reduce([e.level(q) for e in st]) <= 1.0
            lumen = np.minimum.reduce([e.level(q) for e in inner_st]) <= 1.0
            out = _codes(outer, _T.STOMACH_WALL)
            out[lumen] = _T.STOMACH_FLUID
            out[lumen & (q[1] > gas_y)] = _T.STOMACH_GAS
            return out

        canvas.paint(_union_bbox(*[e.bbox() for e in st]), stomach, labels["stomach"], within=cavity)

        # ribs in the upper body wall (absent anteriorly)
        rib_lo = [-big, -big, self.hi[2] - self.rib_extent]

        def ribs(q):
            # oblique bands (ribs descend anteriorly): short arcs in each axial slice
            band = np.mod(q[2] + 0.5 * q[1] - self.rib_phase, self.rib_period) < 7.0 * self.g
            return _codes(band & (q[1] < 0.35 * self.b_ant), _T.CORTICAL_BONE)

        canvas.paint((rib_lo, [big, big, big]), ribs, within=wall)

        for lung in self.lungs:
            canvas.paint(lung.bbox(), _solid(lung, _T.LUNG), within=cavity)

        # bowel loops and gas in the remaining visceral fat
        free = cavity & ~canvas.occupied
        field_ = self.bowel.sample(grid, full)
        canvas.tissue[free & (field_ > self.bowel_threshold)] = _T.BOWEL
        canvas.tissue[free & (field_ > self.bowel_threshold + 2.2)] = _T.BOWEL_GAS

    def factors(self, canvas: _Canvas) -> dict:
        labels = self.labels
        counts = np.bincount(canvas.label.ravel(), minlength=len(labels) + 1)
        out = {
            f"{name.replace(' ', '_')}_volume_ml": round(float(counts[value]) * canvas.grid.voxel_ml, 2)
            for name, value in labels.items()
        }
        out.update(
            subcutaneous_fat_mm=round(self.fat, 1),
            aorta_diameter_mm=round(2 * self.aorta_r, 1),
            body_width_mm=round(2 * self.a, 1),
        )
        return out
