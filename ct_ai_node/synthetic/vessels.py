"""Pulmonary vessel and airway trees, rendered as partial-volume occupancy.

Trees are grown by recursive bisection of random target points that fill the
lung (level by level, fully vectorised): every node serves the points of its
sub-region, its children move part of the way towards the centroids of the two
halves, and radii follow Murray's law (r ~ n_points^(1/2.6)). The result is a
space-filling, tapering, branching tree from the hilum to the periphery.

Rendering is by splatting: samples along each segment deposit their volume
(pi r^2 * step) into the voxels they fall in (trilinear for vessels thinner than a
voxel, soft balls for thicker ones), so that sub-voxel vessels become faint grey
dots and lines exactly like partial-volume averaging on a scanner. Deposits are
sorted by slice once; one slice's occupancy is a few ``np.bincount`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tree:
    p0: np.ndarray  # (M, 3) model mm (z, y, x) segment starts
    p1: np.ndarray  # (M, 3) segment ends
    r: np.ndarray  # (M,) radius mm
    n: np.ndarray  # (M,) number of target points served (territory size)
    depth: np.ndarray  # (M,) generation
    ctrl: np.ndarray | None = None  # (M, 3) quadratic Bezier control points (gently curved vessels)


def grow_tree(points: np.ndarray, root: np.ndarray, rng: np.random.Generator, r_leaf: float,
              murray: float = 3.0, frac=(0.35, 0.6), split=(0.22, 0.5), bend: float = 0.12,
              angular_levels: int = 4, radial: float = 0.35) -> Tree:
    """Bisection tree over ``points`` (N, 3) from ``root`` (3,).

    Each node's points are cut along their longest extent into a side branch
    (fraction ``split`` of the points) and a main branch that continues, which
    gives the monopodial look of real vascular trees rather than symmetric
    Y-forks."""
    pts = np.asarray(points, np.float64)
    root_pt = np.asarray(root, np.float64)[None]
    N = len(pts)
    node_of = np.zeros(N, np.int64)
    pos = [np.asarray(root, np.float64)[None]]
    n_nodes = 1
    seg_p0, seg_p1, seg_n, seg_d = [], [], [], []
    active_pts = np.arange(N)
    cur_pos = pos[0]  # positions of the current frontier nodes, indexed by node_of
    depth = 0
    while active_pts.size:
        ids = node_of[active_pts]
        uniq, inv = np.unique(ids, return_inverse=True)
        k = len(uniq)
        P = pts[active_pts]
        cnt = np.bincount(inv, minlength=k)
        # split axis: largest extent of each node's points
        if depth < angular_levels:
            # near the hilum: split by direction as seen from the node (fan out)
            Q = P - cur_pos[inv]
            Q = Q / (np.linalg.norm(Q, axis=1, keepdims=True) + 1e-9)
        else:
            Q = P
        mins = np.full((k, 3), np.inf)
        maxs = np.full((k, 3), -np.inf)
        for a in range(3):
            np.minimum.at(mins[:, a], inv, Q[:, a])
            np.maximum.at(maxs[:, a], inv, Q[:, a])
        ext = maxs - mins
        ext[:, 0] *= rng.uniform(0.8, 1.2, k)
        axis = np.argmax(ext, axis=1)
        v = Q[np.arange(len(P)), axis[inv]]
        order = np.lexsort((v, inv))
        starts = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        rank = np.empty(len(P), np.int64)
        rank[order] = np.arange(len(P)) - starts[inv[order]]
        sf = rng.uniform(split[0], split[1], k) if depth >= angular_levels else rng.uniform(0.4, 0.6, k)
        sf = np.where(rng.random(k) < 0.5, sf, 1.0 - sf)
        half = np.clip(np.rint(cnt * sf).astype(np.int64), 1, np.maximum(cnt - 1, 1))
        side = (rank >= half[inv]).astype(np.int64)
        child = inv * 2 + side  # child index 0..2k-1
        ccnt = np.bincount(child, minlength=2 * k)
        csum = np.stack([np.bincount(child, P[:, a], minlength=2 * k) for a in range(3)], 1)
        has = ccnt > 0
        cent = csum / np.maximum(ccnt, 1)[:, None]
        parent_pos = cur_pos[np.repeat(np.arange(k), 2)]
        # the first generations branch close to the hilum, so that the big
        # vessels fan out from it instead of running through the lung centre
        lo = min(frac[0], 0.08 + 0.06 * depth)
        hi = min(frac[1], 0.22 + 0.08 * depth)
        f = rng.uniform(lo, hi, 2 * k)[:, None]
        newpos = parent_pos + f * (cent - parent_pos)
        if depth >= angular_levels and radial > 0:
            # vessels run outwards from the hilum: bend each step towards the radial direction
            rad = parent_pos - root_pt
            rad /= np.linalg.norm(rad, axis=1, keepdims=True) + 1e-9
            step = np.linalg.norm(newpos - parent_pos, axis=1, keepdims=True)
            newpos = newpos + radial * step * rad
        leaf = ccnt == 1
        newpos[leaf] = cent[leaf]  # leaves end at their point
        sel = np.nonzero(has)[0]
        seg_p0.append(parent_pos[sel])
        seg_p1.append(newpos[sel])
        seg_n.append(ccnt[sel])
        seg_d.append(np.full(len(sel), depth))
        # next frontier: children with > 1 point
        keep = ccnt[child] > 1
        active_pts = active_pts[keep]
        remap = np.full(2 * k, -1, np.int64)
        nxt = np.nonzero(ccnt > 1)[0]
        remap[nxt] = np.arange(len(nxt))
        node_of[active_pts] = remap[child[keep]]
        cur_pos = newpos[nxt]
        depth += 1
        n_nodes += len(sel)
        if depth > 40:
            break
    p0 = np.concatenate(seg_p0)
    p1 = np.concatenate(seg_p1)
    n = np.concatenate(seg_n)
    r = r_leaf * n.astype(np.float64) ** (1.0 / murray)
    # gentle curvature: control point off the chord, perpendicular to it
    d = p1 - p0
    L = np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    rnd = rng.standard_normal(d.shape)
    perp = rnd - (rnd * d).sum(1, keepdims=True) / L ** 2 * d
    perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
    ctrl = 0.5 * (p0 + p1) + perp * L * rng.uniform(-bend, bend, (len(d), 1))
    return Tree(p0, p1, r, n, np.concatenate(seg_d), ctrl)


class SplatVolume:
    """Per-slice occupancy from splatted segments (voxel-index coordinates)."""

    def __init__(self, shape: tuple[int, int, int], zratio: float):
        self.shape = shape
        self.zratio = float(zratio)  # in-plane voxel size / slice spacing
        self._z: list[np.ndarray] = []
        self._lin: list[np.ndarray] = []
        self._w: list[np.ndarray] = []
        self._ready = False

    def add_segments(self, a: np.ndarray, b: np.ndarray, r_vox: np.ndarray, weight: float | np.ndarray = 1.0,
                     ball_above: float = 0.8, ctrl: np.ndarray | None = None):
        """Segments from ``a`` to ``b`` ((M, 3) voxel coords z, y, x) with radius in
        in-plane voxels ``r_vox`` (M,) and z anisotropy taken from ``self.zratio``."""
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        r_vox = np.asarray(r_vox, np.float64)
        w_all = np.broadcast_to(np.asarray(weight, np.float64), r_vox.shape)
        zr = self.zratio  # in-plane voxel size / slice spacing
        c = 0.5 * (a + b) if ctrl is None else np.asarray(ctrl, np.float64)
        small = r_vox < ball_above
        if small.any():
            self._add_small(a[small], b[small], c[small], r_vox[small], w_all[small], zr)
        big = ~small
        if big.any():
            self._add_balls(a[big], b[big], c[big], r_vox[big], w_all[big], zr)

    @staticmethod
    def _lengths(a, b, c, zr):
        """Polyline length a-c-b in in-plane voxel units (z scaled)."""
        s = np.array([1.0 / zr, 1.0, 1.0])
        return np.linalg.norm((c - a) * s, axis=1) + np.linalg.norm((b - c) * s, axis=1)

    @staticmethod
    def _samples(a, b, c, ns):
        seg = np.repeat(np.arange(len(a)), ns)
        off = np.arange(ns.sum()) - np.repeat(np.cumsum(ns) - ns, ns)
        tt = ((off + 0.5) / ns[seg])[:, None]
        p = (1 - tt) ** 2 * a[seg] + 2 * (1 - tt) * tt * c[seg] + tt ** 2 * b[seg]
        return seg, p

    def _add_small(self, a, b, c, r, w, zr):
        L = self._lengths(a, b, c, zr)
        step = 0.5
        ns = np.maximum(1, np.ceil(L / step).astype(np.int64))
        seg, p = self._samples(a, b, c, ns)
        # occupied volume per sample, in voxel units (in-plane voxel area * slice spacing)
        vol = np.pi * r[seg] ** 2 * (L[seg] / ns[seg]) * zr * w[seg]
        self._trilinear(p, vol)

    def _trilinear(self, p, vol):
        nz, ny, nx = self.shape
        i0 = np.floor(p).astype(np.int64)
        f = p - i0
        for dz in (0, 1):
            wz = f[:, 0] if dz else 1 - f[:, 0]
            iz = i0[:, 0] + dz
            for dy in (0, 1):
                wy = f[:, 1] if dy else 1 - f[:, 1]
                iy = i0[:, 1] + dy
                for dx in (0, 1):
                    wx = f[:, 2] if dx else 1 - f[:, 2]
                    ix = i0[:, 2] + dx
                    ok = (iz >= 0) & (iz < nz) & (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
                    self._z.append(iz[ok].astype(np.int32))
                    self._lin.append((iy[ok] * nx + ix[ok]).astype(np.int32))
                    self._w.append((vol[ok] * wz[ok] * wy[ok] * wx[ok]).astype(np.float32))

    def _add_balls(self, a, b, c, r, w, zr):
        nz, ny, nx = self.shape
        L = self._lengths(a, b, c, zr)
        step = np.maximum(0.5, 0.5 * r)
        ns = np.maximum(1, np.ceil(L / step).astype(np.int64))
        seg, p = self._samples(a, b, c, ns)
        rs = r[seg]
        ws = w[seg]
        hstep = L[seg] / ns[seg]
        # group samples by quantised radius so each group shares one offset stencil
        q = np.round(rs * 4) / 4
        for rq in np.unique(q):
            m = q == rq
            R = rq + 0.5
            rz = R * zr
            oz = np.arange(-int(np.ceil(rz)), int(np.ceil(rz)) + 1)
            oy = np.arange(-int(np.ceil(R)), int(np.ceil(R)) + 1)
            OZ, OY, OX = np.meshgrid(oz, oy, oy, indexing="ij")
            if zr < 0.7:
                # thick slices: the slice integrates over its thickness
                dz_eff = np.maximum(0.0, (np.abs(OZ) - 0.5) / zr)
            else:
                dz_eff = OZ / zr
            dist = np.sqrt(dz_eff ** 2 + OY ** 2 + OX ** 2)
            wk = np.clip(rq - dist + 0.5, 0.0, 1.0)
            keep = wk > 0
            OZ, OY, OX, wk = OZ[keep], OY[keep], OX[keep], wk[keep]
            # scale so that the total equals the tube volume of this sample
            pc = np.rint(p[m]).astype(np.int64)
            vol = np.pi * rq ** 2 * hstep[m] * zr * ws[m]
            scale = vol / wk.sum()
            iz = pc[:, 0:1] + OZ[None]
            iy = pc[:, 1:2] + OY[None]
            ix = pc[:, 2:3] + OX[None]
            ww = scale[:, None] * wk[None]
            ok = (iz >= 0) & (iz < nz) & (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
            self._z.append(iz[ok].astype(np.int32))
            self._lin.append((iy[ok] * nx + ix[ok]).astype(np.int32))
            self._w.append(ww[ok].astype(np.float32))

    def finalize(self):
        if self._z:
            z = np.concatenate(self._z)
            lin = np.concatenate(self._lin)
            w = np.concatenate(self._w)
        else:
            z = np.zeros(0, np.int32)
            lin = np.zeros(0, np.int32)
            w = np.zeros(0, np.float32)
        order = np.argsort(z, kind="stable")
        self.z = z[order]
        self.lin = lin[order]
        self.w = w[order]
        self.bounds = np.searchsorted(self.z, np.arange(self.shape[0] + 1))
        self._z = self._lin = self._w = []
        self._ready = True

    def slice(self, iz: int) -> np.ndarray | None:
        if not self._ready:
            self.finalize()
        s, e = self.bounds[iz], self.bounds[iz + 1]
        if e <= s:
            return None
        ny, nx = self.shape[1:]
        occ = np.bincount(self.lin[s:e], weights=self.w[s:e], minlength=ny * nx).astype(np.float32)
        return occ.reshape(ny, nx)
