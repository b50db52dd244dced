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


def grow_tree(points: np.ndarray, root: np.ndarray, rng: np.random.Generator, r_leaf: float,
              murray: float = 2.6, frac=(0.35, 0.6)) -> Tree:
    """Bisection tree over ``points`` (N, 3) from ``root`` (3,)."""
    pts = np.asarray(points, np.float64)
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
        mins = np.full((k, 3), np.inf)
        maxs = np.full((k, 3), -np.inf)
        for a in range(3):
            np.minimum.at(mins[:, a], inv, P[:, a])
            np.maximum.at(maxs[:, a], inv, P[:, a])
        ext = maxs - mins
        ext[:, 0] *= rng.uniform(0.8, 1.2, k)
        axis = np.argmax(ext, axis=1)
        v = P[np.arange(len(P)), axis[inv]]
        order = np.lexsort((v, inv))
        starts = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        rank = np.empty(len(P), np.int64)
        rank[order] = np.arange(len(P)) - starts[inv[order]]
        half = (cnt + 1) // 2
        side = (rank >= half[inv]).astype(np.int64)
        child = inv * 2 + side  # child index 0..2k-1
        ccnt = np.bincount(child, minlength=2 * k)
        csum = np.stack([np.bincount(child, P[:, a], minlength=2 * k) for a in range(3)], 1)
        has = ccnt > 0
        cent = csum / np.maximum(ccnt, 1)[:, None]
        parent_pos = cur_pos[np.repeat(np.arange(k), 2)]
        f = rng.uniform(frac[0], frac[1], 2 * k)[:, None]
        newpos = parent_pos + f * (cent - parent_pos)
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
    return Tree(p0, p1, r, n, np.concatenate(seg_d))


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
                     ball_above: float = 0.8):
        """Segments from ``a`` to ``b`` ((M, 3) voxel coords z, y, x) with radius in
        in-plane voxels ``r_vox`` (M,) and z anisotropy taken from ``self.zratio``."""
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        r_vox = np.asarray(r_vox, np.float64)
        w_all = np.broadcast_to(np.asarray(weight, np.float64), r_vox.shape)
        zr = self.zratio  # in-plane voxel size / slice spacing
        small = r_vox < ball_above
        if small.any():
            self._add_small(a[small], b[small], r_vox[small], w_all[small], zr)
        big = ~small
        if big.any():
            self._add_balls(a[big], b[big], r_vox[big], w_all[big], zr)

    def _lengths(self, a, b, zr):
        d = b - a
        d_phys = d.copy()
        d_phys[:, 0] /= zr  # z in in-plane voxel units
        return d, np.sqrt((d_phys ** 2).sum(1))

    def _add_small(self, a, b, r, w, zr):
        d, L = self._lengths(a, b, zr)
        step = 0.5
        ns = np.maximum(1, np.ceil(L / step).astype(np.int64))
        seg = np.repeat(np.arange(len(a)), ns)
        off = np.arange(ns.sum()) - np.repeat(np.cumsum(ns) - ns, ns)
        tt = (off + 0.5) / ns[seg]
        p = a[seg] + tt[:, None] * d[seg]
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

    def _add_balls(self, a, b, r, w, zr):
        nz, ny, nx = self.shape
        d, L = self._lengths(a, b, zr)
        step = np.maximum(0.5, 0.5 * r)
        ns = np.maximum(1, np.ceil(L / step).astype(np.int64))
        seg = np.repeat(np.arange(len(a)), ns)
        off = np.arange(ns.sum()) - np.repeat(np.cumsum(ns) - ns, ns)
        tt = (off + 0.5) / ns[seg]
        p = a[seg] + tt[:, None] * d[seg]
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
