"""Random fields for the phantom generator: smooth (spatially correlated) noise
evaluated on arbitrary grids, and CT-like image noise.

Smooth fields are defined by a coarse lattice of independent Gaussian values in
physical (mm) coordinates; evaluating the field on a grid is a separable
kernel interpolation (three small matrix products), so a field can be sampled
cheaply on a whole volume, on one slice, or on a coarse analysis grid, always
giving the same values at the same physical position.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sfft


def _interp_matrix(coords_mm: np.ndarray, origin: float, step: float, n: int, sigma_cells: float = 0.85) -> np.ndarray:
    """Rows: output samples; columns: lattice nodes; Gaussian kernel weights,
    normalised so that the interpolated field keeps roughly unit variance."""
    u = (np.asarray(coords_mm, np.float64) - origin) / step  # position in lattice cells
    nodes = np.arange(n, dtype=np.float64)
    w = np.exp(-0.5 * ((u[:, None] - nodes[None, :]) / sigma_cells) ** 2)
    # normalise rows to unit L2 norm -> each output value has unit variance
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True)) + 1e-12
    return w.astype(np.float32)


class SmoothField:
    """A 3D random field with correlation length ``corr_mm`` over a box (mm).

    ``box`` = ((z0, z1), (y0, y1), (x0, x1)) in mm. Values have approximately
    zero mean and unit variance; outside the box the field fades to 0.
    """

    def __init__(self, rng: np.random.Generator, box, corr_mm: float | tuple[float, float, float]):
        if np.isscalar(corr_mm):
            corr_mm = (float(corr_mm),) * 3
        self.step = tuple(max(0.5, c / 2.0) for c in corr_mm)  # lattice step per axis
        self.origin = []
        self.n = []
        for (lo, hi), st in zip(box, self.step):
            o = lo - 2 * st
            n = int(np.ceil((hi - lo) / st)) + 5
            self.origin.append(o)
            self.n.append(n)
        self.lattice = rng.standard_normal(tuple(self.n)).astype(np.float32)

    def matrices(self, zc, yc, xc):
        mz = _interp_matrix(zc, self.origin[0], self.step[0], self.n[0])
        my = _interp_matrix(yc, self.origin[1], self.step[1], self.n[1])
        mx = _interp_matrix(xc, self.origin[2], self.step[2], self.n[2])
        return mz, my, mx

    def grid(self, zc, yc, xc) -> np.ndarray:
        """Field on the tensor grid zc x yc x xc (1-D coordinate arrays in mm)."""
        mz, my, mx = self.matrices(np.atleast_1d(zc), np.atleast_1d(yc), np.atleast_1d(xc))
        # contract z first (small), then y and x per slice via tensordot
        nzl, nyl, nxl = self.lattice.shape
        a = (mz @ self.lattice.reshape(nzl, -1)).reshape(-1, nxl)  # (nz*ny_l, nx_l)
        a = (a @ mx.T).reshape(len(mz), nyl, len(mx))  # (nz, ny_l, nx)
        a = my @ a.transpose(1, 0, 2).reshape(nyl, -1)  # (ny, nz*nx)
        return np.ascontiguousarray(a.reshape(len(my), len(mz), len(mx)).transpose(1, 0, 2))

    def slice_at(self, z_mm: float, yc, xc, _cache={}) -> np.ndarray:
        return self.grid(np.array([z_mm]), yc, xc)[0]

    def points(self, pts_zyx: np.ndarray) -> np.ndarray:
        """Field at scattered points (N, 3) in mm (trilinear on the lattice after
        Gaussian prefiltering is approximated by direct kernel sums over 4^3 nodes)."""
        pts = np.asarray(pts_zyx, np.float64)
        u = [(pts[:, i] - self.origin[i]) / self.step[i] for i in range(3)]
        base = [np.floor(ui).astype(np.int64) - 1 for ui in u]
        out = np.zeros(len(pts), np.float64)
        norm = np.zeros(len(pts), np.float64)
        for dz in range(4):
            iz = np.clip(base[0] + dz, 0, self.n[0] - 1)
            wz = np.exp(-0.5 * ((u[0] - (base[0] + dz)) / 0.85) ** 2)
            for dy in range(4):
                iy = np.clip(base[1] + dy, 0, self.n[1] - 1)
                wy = np.exp(-0.5 * ((u[1] - (base[1] + dy)) / 0.85) ** 2)
                for dx in range(4):
                    ix = np.clip(base[2] + dx, 0, self.n[2] - 1)
                    wx = np.exp(-0.5 * ((u[2] - (base[2] + dx)) / 0.85) ** 2)
                    w = wz * wy * wx
                    out += w * self.lattice[iz, iy, ix]
                    norm += w * w
        return (out / np.sqrt(norm + 1e-12)).astype(np.float32)


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, C1-smooth in between (float32, new array)."""
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class NoiseBank:
    """CT-like quantum noise: a bank of in-plane correlated noise slices with a
    filtered-back-projection-like noise power spectrum (ramp times apodisation
    window: sharp kernels have high-frequency, grainy noise; soft kernels blotchy).

    Slices are drawn from the bank with random circular shifts and flips, which
    is much cheaper than generating fresh Gaussian noise for every slice.
    """

    def __init__(self, rng: np.random.Generator, ny: int, nx: int, f_peak: float, n_bank: int = 12):
        self.rng = rng
        n_bank = int(n_bank)
        white = rng.standard_normal((n_bank, ny, nx), dtype=np.float32)
        fy = sfft.fftfreq(ny)[:, None]
        fx = sfft.rfftfreq(nx)[None, :]
        f = np.sqrt(fy * fy + fx * fx)
        # NPS ~ f * exp(-(f/fc)^2): peak at fc/sqrt(2); amplitude filter = sqrt(NPS)
        fc = f_peak * np.sqrt(2.0)
        amp = np.sqrt(f * np.exp(-((f / fc) ** 2)) + 1e-3 * np.exp(-((f / 0.02) ** 2)))
        spec = sfft.rfft2(white, axes=(1, 2), workers=2)
        spec *= amp[None].astype(np.complex64)
        bank = sfft.irfft2(spec, s=(ny, nx), axes=(1, 2), workers=2).astype(np.float32)
        bank /= bank.std(axis=(1, 2), keepdims=True) + 1e-6
        self.bank = bank

    def draw(self, out: np.ndarray | None = None) -> np.ndarray:
        """One unit-variance noise slice."""
        r = self.rng
        k = int(r.integers(len(self.bank)))
        sy = int(r.integers(self.bank.shape[1]))
        sx = int(r.integers(self.bank.shape[2]))
        a = self.bank[k]
        a = np.roll(a, (sy, sx), axis=(0, 1))
        if r.random() < 0.5:
            a = a[::-1]
        if r.random() < 0.5:
            a = a[:, ::-1]
        if out is not None:
            out[...] = a
            return out
        return np.ascontiguousarray(a)


class TextureBank:
    """Cheap 3-D-consistent band-limited texture for full-resolution slices.

    A few 2-D Gaussian random fields with correlation length ``corr_px`` are
    made by FFT filtering; nodes every ``z_step`` slices get one of them with a
    random shift and flip, and a slice is the linear blend of its two nodes,
    normalised to unit variance. Used for lung micro-texture and lesion
    heterogeneity where a full 3-D field at 512x512 would be too slow.
    """

    def __init__(self, rng: np.random.Generator, nz: int, ny: int, nx: int, corr_px: float, z_step: float,
                 n_bank: int = 6):
        white = rng.standard_normal((n_bank, ny, nx), dtype=np.float32)
        fy = sfft.fftfreq(ny)[:, None]
        fx = sfft.rfftfreq(nx)[None, :]
        f2 = fy * fy + fx * fx
        amp = np.exp(-0.5 * f2 * (2 * np.pi * corr_px / 2.0) ** 2).astype(np.complex64)
        spec = sfft.rfft2(white, axes=(1, 2), workers=1) * amp[None]
        bank = sfft.irfft2(spec, s=(ny, nx), axes=(1, 2), workers=1).astype(np.float32)
        bank /= bank.std(axis=(1, 2), keepdims=True) + 1e-6
        self.bank = bank
        self.z_step = max(1e-3, float(z_step))
        n_nodes = int(np.ceil(nz / self.z_step)) + 2
        self.nodes = [(int(rng.integers(n_bank)), int(rng.integers(ny)), int(rng.integers(nx)),
                       bool(rng.random() < 0.5), bool(rng.random() < 0.5)) for _ in range(n_nodes)]
        self._cache: dict[int, np.ndarray] = {}

    def _node(self, k: int) -> np.ndarray:
        a = self._cache.get(k)
        if a is None:
            b, sy, sx, fy, fx = self.nodes[k]
            a = np.roll(self.bank[b], (sy, sx), axis=(0, 1))
            if fy:
                a = a[::-1]
            if fx:
                a = a[:, ::-1]
            a = np.ascontiguousarray(a)
            if len(self._cache) > 3:
                self._cache.pop(min(self._cache))
            self._cache[k] = a
        return a

    def slice(self, iz: int, win=None) -> np.ndarray:
        u = iz / self.z_step
        k = int(np.floor(u))
        f = float(u - k)
        a = self._node(k)
        b = self._node(k + 1)
        if win is not None:
            a, b = a[win], b[win]
        if f < 1e-6:
            return a.copy()
        norm = 1.0 / np.sqrt((1 - f) ** 2 + f * f)
        return ((1 - f) * norm) * a + (f * norm) * b
