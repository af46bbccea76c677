"""Shared helpers of the reliability tests: bad inputs, CLI runs, output-folder checks.

No tests here; imported by tests/test_reliability*.py, test_crash*.py, test_fuzz*.py.
The good slides and the tiny model come from tests/test_run_helpers.py (64 px tiles at 1 um/px).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_run_helpers import write_model, write_slides

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO", "cli", "cli_subprocess", "corrupt_tiles", "files_outside", "snapshot",
    "stderr_lines", "subprocess_env", "write_model", "write_slides", "write_svs",
]


def write_svs(path: Path, size_px: int = 12 * 64, mpp_um: float | None = 1.0,
              color: tuple[int, int, int] | None = (200, 90, 160), tile_px: int = 64,
              **kw: object) -> Path:
    """An Aperio-like SVS (JPEG tiles) with a tissue-coloured block in the middle half.

    ``color=None``: blank (background only); an RGB colour covering everything when
    ``kw['full']`` is true.
    """
    from tmequant.wsi import write_pyramid_tiff

    full = bool(kw.pop("full", False))
    img = np.full((size_px, size_px, 3), (240, 238, 242), np.uint8)
    if color is not None:
        if full:
            img[:] = color
        else:
            a, b = size_px // 4, 3 * size_px // 4
            img[a:b, a:b] = color
            rng = np.random.default_rng(1)
            for y, x in rng.integers(a + 4, b - 4, (400, 2)):
                img[y - 3:y + 4, x - 3:x + 4] = (60, 30, 110)
    return write_pyramid_tiff(path, img, mpp_um, flavor="svs", tile_px=tile_px, **kw)  # type: ignore[arg-type]


def corrupt_tiles(path: Path, level: int = 0, start_fraction: float = 0.5) -> int:
    """Overwrite the JPEG bytes of the level's tiles from ``start_fraction`` on with zeros.

    The TIFF structure (and so OpenSlide's open) stays intact; decoding those tiles fails.
    Returns the number of tiles corrupted.
    """
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    first = int(len(offsets) * start_fraction)
    with open(path, "r+b") as fh:
        for off, n in zip(offsets[first:], counts[first:]):
            fh.seek(off)
            fh.write(b"\x00" * n)
    return len(offsets) - first


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and folder under ``root``, except ``exclude``."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if exclude is not None and (d == exclude or exclude in d.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if exclude is not None and p == exclude:
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns
                                             if not p.is_dir() else 0)
    return out


def files_outside(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Paths that appeared or changed between two snapshots."""
    return sorted(k for k, v in after.items() if before.get(k) != v)


def cli(argv: list[str], capsys: object) -> tuple[int, str, str]:
    """Run ``tmequant`` in-process as a user would: (exit code, stdout, stderr)."""
    from tmequant.cli import main

    rc = main(argv)
    cap = capsys.readouterr()  # type: ignore[attr-defined]
    return rc, cap.out, cap.err


def stderr_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("TMEQUANT_FAULT", None)
    env.update(extra)
    return env


def cli_subprocess(argv: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m tmequant ARGV`` in a fresh process (faults, signals, memory)."""
    return subprocess.run([sys.executable, "-m", "tmequant", *argv], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=timeout)
