"""Foam phantoms and simulated sparse-angle, noisy parallel-beam CT (NumPy + scikit-image).

The data of the paper's CT experiment (Table 2), generated locally and small:

- :func:`foam_phantom`: a disc (2D) or a cylinder along axis 0 (3D) of material
  (value 1) with many random, non-overlapping circular / spherical voids
  (value 0), on a background of 0;
- :func:`simulate_fbp`: parallel-beam projections at ``n_angles`` angles over
  180° (``skimage.transform.radon``), Poisson noise on the transmitted photon
  counts (Beer–Lambert), and filtered back-projection
  (``skimage.transform.iradon``, ramp filter); 3D volumes slice by slice along
  axis 0 (the rotation axis), as for a parallel beam with an untilted axis.

The paper simulates at 512³ with a slanted, perturbed rotation axis and trains
at 256³; here the axis is exact and sizes are parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iunet_nb.common import check_dim

__all__ = ["Voids", "sample_voids", "foam_phantom", "noisy_sinogram", "simulate_fbp", "fbp_of_sinogram"]


@dataclass(frozen=True)
class Voids:
    """Void centres ``(n, dim)`` and radii ``(n,)`` in pixels (array index coordinates)."""

    centres: np.ndarray
    radii: np.ndarray


def _check_size_dim(size: int, dim: int) -> None:
    check_dim(dim, (2, 3))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8 (pixels per side), got size={size!r}")


def sample_voids(size: int, dim: int, n_voids: int, radius_range: tuple[float, float],
                 rng: np.random.Generator, disc_radius: float, gap: float = 1.0,
                 max_tries: int = 200) -> Voids:
    """Random non-overlapping voids inside the disc / cylinder, by rejection sampling.

    Args:
        size: pixels per side of the image / volume.
        dim: 2 (circles in a disc) or 3 (spheres in a cylinder along axis 0).
        n_voids: how many voids to place (fewer if a void finds no place in ``max_tries`` draws:
            then the foam is considered full and sampling stops).
        radius_range: ``(r_min, r_max)`` in pixels; radii are drawn uniformly.
        rng: NumPy generator.
        disc_radius: radius of the disc / cylinder in pixels (centred in the image).
        gap: minimum material thickness between two voids and between a void and the rim (pixels).
        max_tries: candidates drawn per void before giving up on it.

    Returns:
        :class:`Voids`: every pair satisfies ``|c_i - c_j| >= r_i + r_j + gap``, and every void lies
        within ``disc_radius - gap`` of the axis (and, in 3D, inside the volume along axis 0).
    """
    _check_size_dim(size, dim)
    r_min, r_max = radius_range
    if not 0 < r_min <= r_max:
        raise ValueError(f"radius_range must be (r_min, r_max) with 0 < r_min <= r_max, got {radius_range}")
    if r_max + gap >= disc_radius:
        raise ValueError(f"radius_range {radius_range} does not fit in a disc of radius {disc_radius}")
    centre = (size - 1) / 2
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(n_voids):
        placed = False
        for _ in range(max_tries):
            r = rng.uniform(r_min, r_max)
            # uniform in the disc of radius (disc_radius - r - gap) around the axis
            reach = disc_radius - r - gap
            rho, phi = reach * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            c = np.array([centre + rho * np.sin(phi), centre + rho * np.cos(phi)])
            if dim == 3:
                c = np.concatenate([[rng.uniform(r + gap, size - 1 - r - gap)], c])
            if centres:
                dist = np.linalg.norm(np.asarray(centres) - c, axis=1)
                if np.any(dist < np.asarray(radii) + r + gap):
                    continue
            centres.append(c)
            radii.append(r)
            placed = True
            break
        if not placed:  # the foam is full
            break
    return Voids(np.asarray(centres, dtype=np.float64).reshape(-1, dim), np.asarray(radii, dtype=np.float64))


def foam_phantom(size: int, dim: int = 2, n_voids: int | None = None,
                 radius_range: tuple[float, float] | None = None, seed: int | np.random.Generator = 0,
                 return_voids: bool = False) -> np.ndarray | tuple[np.ndarray, Voids]:
    """A foam: a disc / cylinder of material (1) with random non-overlapping voids (0).

    Args:
        size: pixels per side; the result has shape ``(size,) * dim``.
        dim: 2 or 3 (cylinder along axis 0).
        n_voids: voids to place (default 80 in 2D, 400 in 3D; fewer if they no longer fit).
        radius_range: void radii in pixels (default ``(size/50, size/14)``, at least ``(1, 2)``).
        seed: an int or a NumPy generator.
        return_voids: also return the :class:`Voids`.

    Returns:
        ``float32`` array of shape ``(size,) * dim`` with values in {0, 1} (and the voids if asked).
    """
    _check_size_dim(size, dim)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    disc_radius = 0.45 * size
    if radius_range is None:
        radius_range = (max(1.0, size / 50), max(2.0, size / 14))
    if n_voids is None:
        n_voids = 80 if dim == 2 else 400
    voids = sample_voids(size, dim, n_voids, radius_range, rng, disc_radius)
    grid = np.arange(size, dtype=np.float64)
    centre = (size - 1) / 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disc = (yy - centre) ** 2 + (xx - centre) ** 2 <= disc_radius ** 2
    image = np.broadcast_to(disc, (size,) * dim).astype(np.float32)
    for c, r in zip(voids.centres, voids.radii):
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, size)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        axes = np.meshgrid(*(grid[s] - ci for s, ci in zip(box, c)), indexing="ij")
        image[box][sum(a ** 2 for a in axes) <= r ** 2] = 0.0
    return (image, voids) if return_voids else image


def fbp_of_sinogram(sinogram: np.ndarray, theta: np.ndarray, size: int) -> np.ndarray:
    """Filtered back-projection (ramp filter) of a ``(detector, angles)`` sinogram to ``(size, size)``."""
    from skimage.transform import iradon

    return iradon(sinogram, theta=theta, filter_name="ramp", circle=True, output_size=size,
                  preserve_range=True).astype(np.float32)


def noisy_sinogram(image: np.ndarray, n_angles: int, photons: float | None = 1e3, attenuation: float = 2.0,
                   seed: int | np.random.Generator = 0) -> tuple[np.ndarray, np.ndarray]:
    """Parallel-beam line integrals of an ``(H, H)`` image, with Poisson noise on the photon counts.

    The image is an attenuation map scaled so that a ray through the full diameter of the disc
    (0.9 × H pixels of material) has line integral ``attenuation``; detected photons are
    ``Poisson(photons · exp(-line integral))`` (at least 1), log-transformed back to line integrals
    and rescaled to the image's units (pixel value × pixels).

    Returns:
        ``(sinogram, theta)``: ``(H, n_angles)`` float64 (detector × angle) and the angles in degrees,
        equally spaced over [0°, 180°).
    """
    from skimage.transform import radon

    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be (H, H), got shape {image.shape}")
    if isinstance(n_angles, bool) or not isinstance(n_angles, (int, np.integer)) or n_angles < 1:
        raise ValueError(f"n_angles must be a positive int, got {n_angles!r}")
    if photons is not None and not photons > 0:
        raise ValueError(f"photons must be positive or None (no noise), got {photons!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)
    mu = attenuation / (0.9 * image.shape[0])  # attenuation per pixel of material
    sinogram = radon(image.astype(np.float64), theta=theta, circle=True) * mu
    if photons is not None:
        counts = np.maximum(rng.poisson(photons * np.exp(-sinogram)), 1)
        sinogram = -np.log(counts / photons)
    return sinogram / mu, theta


def simulate_fbp(phantom: np.ndarray, n_angles: int, photons: float | None = 1e3,
                 attenuation: float = 2.0, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Sparse-angle, noisy parallel-beam CT of ``phantom`` and its filtered back-projection.

    Args:
        phantom: ``(H, H)`` image or ``(D, H, H)`` volume (slices along axis 0 are reconstructed
            independently).
        n_angles, photons, attenuation: see :func:`noisy_sinogram` (``photons=None``: no noise).
        seed: int or NumPy generator for the noise.

    Returns:
        The FBP reconstruction, ``float32``, same shape as ``phantom`` and on its scale.
    """
    if phantom.ndim not in (2, 3) or phantom.shape[-1] != phantom.shape[-2]:
        raise ValueError(f"phantom must be (H, H) or (D, H, H), got shape {phantom.shape}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if phantom.ndim == 3:
        return np.stack([simulate_fbp(s, n_angles, photons, attenuation, rng) for s in phantom])
    sinogram, theta = noisy_sinogram(phantom, n_angles, photons, attenuation, rng)
    return fbp_of_sinogram(sinogram, theta, phantom.shape[-1])
