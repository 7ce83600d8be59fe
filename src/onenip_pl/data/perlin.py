"""Smooth random fields (Perlin gradient noise, value noise) drawn from an explicit numpy Generator.

Used for DRAEM-style anomaly masks, for procedural fallback textures and for
the demo data set. Every function takes the ``rng`` it draws from, so results
are reproducible and safe in data-loader worker processes.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic ease curve: zero first and second derivative at 0 and 1."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _lattice_coordinates(length: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer cell index and fractional offset of each pixel along one axis.

    The lattice spans ``cells`` whole cells of ceil(length / cells) pixels, so
    any length works (the authors' version needs length divisible by cells).
    """
    cell_size = -(-length // cells)
    position = np.arange(length, dtype=np.float32) / np.float32(cell_size)
    index = position.astype(np.int64)
    return index, position - index


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise of ``shape`` with ``cells`` = (rows, cols) lattice cells.

    Values lie roughly in [-1, 1] (scaled by sqrt(2) like DRAEM), float32.
    """
    height, width = shape
    cells_y, cells_x = cells
    if height < 1 or width < 1 or cells_y < 1 or cells_x < 1:
        raise ValueError(f"perlin_noise needs positive shape and cells, got shape={shape}, cells={cells}")
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(cells_y + 1, cells_x + 1))
    grad_y = np.cos(angles).astype(np.float32)
    grad_x = np.sin(angles).astype(np.float32)
    iy, fy = _lattice_coordinates(height, cells_y)
    ix, fx = _lattice_coordinates(width, cells_x)
    fy_col, fx_row = fy[:, None], fx[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        """Dot product of each pixel's offset to lattice corner (dy, dx) with that corner's gradient."""
        rows_y, rows_x = grad_y[iy + dy], grad_x[iy + dy]
        return rows_y[:, ix + dx] * (fy_col - dy) + rows_x[:, ix + dx] * (fx_row - dx)

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    ty, tx = _fade(fy_col), _fade(fx_row)
    top = n00 + tx * (n01 - n00)
    bottom = n10 + tx * (n11 - n10)
    return (np.float32(math.sqrt(2.0)) * (top + ty * (bottom - top))).astype(np.float32)


def fractal_noise(
    shape: tuple[int, int],
    base_cells: int,
    octaves: int,
    rng: np.random.Generator,
    persistence: float = 0.5,
) -> np.ndarray:
    """Sum of Perlin octaves (cells doubling, amplitude times ``persistence``), normalised to [-1, 1]."""
    total = np.zeros(shape, dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        cells = base_cells * 2**octave
        total += np.float32(amplitude) * perlin_noise(shape, (cells, cells), rng)
        norm += amplitude
        amplitude *= persistence
    return total / np.float32(norm)


def value_noise(
    shape: tuple[int, int], cells: tuple[int, int], channels: int, rng: np.random.Generator
) -> np.ndarray:
    """Smooth H×W×C field in [0, 1]: random values on a (rows+1)×(cols+1) grid, cubic-upsampled.

    Much cheaper than Perlin noise; good enough where only "smooth and random" matters.
    """
    height, width = shape
    cells_y, cells_x = cells
    grid = rng.random((cells_y + 1, cells_x + 1, channels), dtype=np.float32)
    field = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(field.reshape(height, width, channels), 0.0, 1.0)
