"""Biomarkers of one finished slide store: the store + model name -> :class:`BiomarkerResult`.

The one call behind ``tmequant biomarkers`` (and the pipeline's biomarker stage): read the
tile grid and the model's predictions from the store, optionally bin a cell table onto it,
and run :func:`compute_biomarkers`. Pure reading: the store is never written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd

from tmequant.biomarkers.aggregate import BiomarkerResult, compute_biomarkers
from tmequant.biomarkers.cells import read_cell_table
from tmequant.biomarkers.grid import TileGrid
from tmequant.biomarkers.params import BiomarkerParams
from tmequant.errors import StoreError

if TYPE_CHECKING:
    from tmequant.store import SlideStore

log = logging.getLogger("tmequant")


def biomarkers_for_store(
    store: SlideStore | str | os.PathLike[str],
    model_name: str | None = None,
    *,
    cells: pd.DataFrame | str | os.PathLike[str] | None = None,
    params: BiomarkerParams | None = None,
    cell_role_map: Mapping[str, str] | None = None,
    nucleus_counts: bool = True,
) -> BiomarkerResult:
    """All biomarkers of one slide from its store (docs/biomarkers.md, docs/output-schema.md).

    store: a :class:`~tmequant.store.SlideStore` or its path (local or fsspec URL).
    model_name: the ``predictions/<model_name>`` group to read; None picks the store's only
    finished predictions (StoreError when there are none or several).
    cells: a cell table (DataFrame with ``x, y`` level-0 px and ``class``) or a path for
    :func:`read_cell_table`; it takes precedence for the lymphocyte counts.
    The row gets ``cell_table_path`` (the path, or None for no table or an in-memory one).
    nucleus_counts: use the nucleus counter's counts when they are the best source (False:
    ignore them, e.g. when the counter was switched off for this run).
    """
    from tmequant.store import SlideStore

    st = store if isinstance(store, SlideStore) else SlideStore(store)
    if model_name is None:
        names = st.prediction_names()
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise StoreError(
                f"name the predictions to use (model_name); finished predictions: {found}", st.path)
        model_name = names[0]
    cell_path = None
    table: pd.DataFrame | None = None
    source = "cell_table"
    if isinstance(cells, pd.DataFrame):
        table = cells
    elif cells is not None:
        cell_path = str(cells)
        table = read_cell_table(cells)
    elif st.has_cells(model_name):
        # A detector's own cells: counts and cell-resolution compartments, roles per its card.
        table = st.read_cells(model_name)
        source = "model_cells"
        card_roles = dict(st.prediction_card(model_name).get("cell_roles") or {})
        cell_role_map = {**card_roles, **(cell_role_map or {})}
    grid = TileGrid.from_store(st, model_name, nucleus_counts=nucleus_counts)
    res = compute_biomarkers(grid, cells=table, params=params, cell_role_map=cell_role_map,
                             cells_source=source)
    res.row["cell_table_path"] = cell_path
    log.debug("%s: biomarkers from predictions/%s (counts: %s)", st.path, model_name,
              res.row["count_source"])
    return res


__all__ = ["biomarkers_for_store"]
