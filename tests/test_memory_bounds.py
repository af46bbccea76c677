"""Memory bounded by what is admitted (issue 16, item 12): model cards with large tiles.

A card with 4096 px tiles was admitted (``tile_px <= 8192``) and `predict` then held a batch
of 32 such tiles: 13.5 GB for a 3-tile slide. Now the default batch is a pixel budget and the
card's tile size is bounded by what one tile costs (measured figures: docs/reliability.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_run_helpers import write_model

from tmequant.cli import main
from tmequant.inference.engine import CPU_BATCH, CUDA_BATCH, default_batch_size


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_batch_is_a_pixel_budget(device: str):
    base = CUDA_BATCH if device == "cuda" else CPU_BATCH
    assert default_batch_size(device, 224) == base  # the reference tile: unchanged default
    assert default_batch_size(device, 112) == base  # smaller tiles never raise the count
    for px in (256, 448, 512, 1024):
        bs = default_batch_size(device, px)
        assert 1 <= bs < base
        # the budget is held: bs tiles of px cost no more pixels than base tiles of 224 px
        assert bs * px * px <= base * 224 * 224
        # and it is not wasted: one more tile would go over (unless already at the floor of 1)
        assert bs == 1 or (bs + 1) * px * px > base * 224 * 224
    assert default_batch_size("cpu", 1024) == 1


def test_card_with_tiles_too_large_for_memory_is_refused(tmp_path: Path, capsys):
    folder = tmp_path / "big"
    write_model(folder)
    card_path = folder / "model.json"
    card = json.loads(card_path.read_text())
    card["tile_px"] = 4096
    card_path.write_text(json.dumps(card))
    rc = main(["-q", "models", "show", str(folder)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert any("model.json" in ln and "tile_px" in ln and "1024" in ln for ln in err.splitlines()), err
    card["tile_px"] = 1024  # the largest admitted size loads
    card_path.write_text(json.dumps(card))
    assert main(["-q", "models", "show", str(folder)]) == 0
