"""tmequant: H&E whole-slide images to tumour-microenvironment biomarkers.

Per-MPP tiling into a zarr store per slide, a timm tissue/cell model, and
compartment-aware TIL density, immune exclusion, immune phenotype and TLS readouts.

The public API (docs/api.md) is this module's ``__all__``::

    import tmequant as tq

    res = tq.tile_slide("slide.svs", "out/")                  # -> TileResult
    model = tq.load_model("models/my-model")                  # a model folder or a name
    tq.predict_store(res.store_path, model)                   # -> PredictResult
    tq.count_nuclei(res.store_path)                           # -> CountResult
    row = tq.biomarkers_for_store(res.store_path, model.card.name).row   # units in the keys

Names are imported on first use, so ``import tmequant`` is fast, imports neither torch nor
zarr, and changes no global state (thread settings, warning filters, logging handlers).
Library code logs to the ``"tmequant"`` logger and never prints.
"""

import importlib as _importlib
import typing as _typing

from tmequant._version import __version__
from tmequant.errors import (
    CellTableError,
    InputError,
    ModelError,
    ParamsError,
    SlideError,
    StoreError,
    TmequantError,
)

if _typing.TYPE_CHECKING:  # what mypy and IDEs see; at run time these load lazily (__getattr__)
    from tmequant.biomarkers.aggregate import BiomarkerResult as BiomarkerResult
    from tmequant.biomarkers.aggregate import compute_biomarkers as compute_biomarkers
    from tmequant.biomarkers.cells import read_cell_table as read_cell_table
    from tmequant.biomarkers.grid import TileGrid as TileGrid
    from tmequant.biomarkers.params import BiomarkerParams as BiomarkerParams
    from tmequant.biomarkers.store import biomarkers_for_store as biomarkers_for_store
    from tmequant.inference.cells import detect_image as detect_image
    from tmequant.inference.engine import PredictResult as PredictResult
    from tmequant.inference.engine import predict_store as predict_store
    from tmequant.inference.nuclei import CountResult as CountResult
    from tmequant.inference.nuclei import NucleusCounterParams as NucleusCounterParams
    from tmequant.inference.nuclei import count_store as count_nuclei
    from tmequant.inputs import SlideSpec as SlideSpec
    from tmequant.inputs import expand_stores as expand_stores
    from tmequant.models.card import ModelCard as ModelCard
    from tmequant.models.io import LoadedModel as LoadedModel
    from tmequant.models.registry import list_models as list_models
    from tmequant.models.registry import load_model as load_model
    from tmequant.pipeline import RunResult as RunResult
    from tmequant.pipeline import resolve_tiling_params as resolve_tiling_params
    from tmequant.pipeline import run_batch as run_batch
    from tmequant.pipeline import write_biomarker_tables as write_biomarker_tables
    from tmequant.tiling.store import SlideStore as SlideStore
    from tmequant.tiling.tile import TileResult as TileResult
    from tmequant.tiling.tile import TilingParams as TilingParams
    from tmequant.tiling.tile import tile_slide as tile_slide
    from tmequant.training.evaluate import EvalResult as EvalResult
    from tmequant.training.evaluate import evaluate as evaluate
    from tmequant.training.trainer import TrainConfig as TrainConfig
    from tmequant.training.trainer import TrainResult as TrainResult
    from tmequant.training.trainer import train as train
    from tmequant.wsi.slide import Slide as Slide
    from tmequant.wsi.slide import SlideInfo as SlideInfo
    from tmequant.wsi.slide import open_slide as open_slide
    from tmequant.wsi.tissue import TissueParams as TissueParams

# public name -> (module, attribute); loaded on first access by __getattr__
_LAZY: dict[str, tuple[str, str]] = {
    # slides
    "open_slide": ("tmequant.wsi.slide", "open_slide"),
    "Slide": ("tmequant.wsi.slide", "Slide"),
    "SlideInfo": ("tmequant.wsi.slide", "SlideInfo"),
    "SlideSpec": ("tmequant.inputs", "SlideSpec"),
    # tiling and the slide store
    "tile_slide": ("tmequant.tiling.tile", "tile_slide"),
    "TilingParams": ("tmequant.tiling.tile", "TilingParams"),
    "TissueParams": ("tmequant.wsi.tissue", "TissueParams"),
    "TileResult": ("tmequant.tiling.tile", "TileResult"),
    "SlideStore": ("tmequant.tiling.store", "SlideStore"),
    "expand_stores": ("tmequant.inputs", "expand_stores"),
    # models and prediction
    "load_model": ("tmequant.models.registry", "load_model"),
    "list_models": ("tmequant.models.registry", "list_models"),
    "LoadedModel": ("tmequant.models.io", "LoadedModel"),
    "ModelCard": ("tmequant.models.card", "ModelCard"),
    "predict_store": ("tmequant.inference.engine", "predict_store"),
    "PredictResult": ("tmequant.inference.engine", "PredictResult"),
    "detect_image": ("tmequant.inference.cells", "detect_image"),
    # the weight-free nucleus counter
    "count_nuclei": ("tmequant.inference.nuclei", "count_store"),
    "NucleusCounterParams": ("tmequant.inference.nuclei", "NucleusCounterParams"),
    "CountResult": ("tmequant.inference.nuclei", "CountResult"),
    # biomarkers
    "TileGrid": ("tmequant.biomarkers.grid", "TileGrid"),
    "compute_biomarkers": ("tmequant.biomarkers.aggregate", "compute_biomarkers"),
    "biomarkers_for_store": ("tmequant.biomarkers.store", "biomarkers_for_store"),
    "BiomarkerParams": ("tmequant.biomarkers.params", "BiomarkerParams"),
    "BiomarkerResult": ("tmequant.biomarkers.aggregate", "BiomarkerResult"),
    "read_cell_table": ("tmequant.biomarkers.cells", "read_cell_table"),
    "write_biomarker_tables": ("tmequant.pipeline", "write_biomarker_tables"),
    # the whole pipeline
    "run_batch": ("tmequant.pipeline", "run_batch"),
    "RunResult": ("tmequant.pipeline", "RunResult"),
    "resolve_tiling_params": ("tmequant.pipeline", "resolve_tiling_params"),
    # fine-tuning
    "train": ("tmequant.training.trainer", "train"),
    "TrainConfig": ("tmequant.training.trainer", "TrainConfig"),
    "TrainResult": ("tmequant.training.trainer", "TrainResult"),
    "evaluate": ("tmequant.training.evaluate", "evaluate"),
    "EvalResult": ("tmequant.training.evaluate", "EvalResult"),
}

__all__ = [  # noqa: RUF022 - grouped by step, in the order of docs/api.md
    "__version__",
    # errors
    "CellTableError",
    "InputError",
    "ModelError",
    "ParamsError",
    "SlideError",
    "StoreError",
    "TmequantError",
    # slides
    "open_slide",
    "Slide",
    "SlideInfo",
    "SlideSpec",
    # tiling and the slide store
    "tile_slide",
    "TilingParams",
    "TissueParams",
    "TileResult",
    "SlideStore",
    "expand_stores",
    # models and prediction
    "load_model",
    "list_models",
    "LoadedModel",
    "ModelCard",
    "predict_store",
    "PredictResult",
    "detect_image",
    # the weight-free nucleus counter
    "count_nuclei",
    "NucleusCounterParams",
    "CountResult",
    # biomarkers
    "TileGrid",
    "compute_biomarkers",
    "biomarkers_for_store",
    "BiomarkerParams",
    "BiomarkerResult",
    "read_cell_table",
    "write_biomarker_tables",
    # the whole pipeline
    "run_batch",
    "RunResult",
    "resolve_tiling_params",
    # fine-tuning
    "train",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "EvalResult",
]


def __getattr__(name: str) -> object:
    """Load a public name on first access (PEP 562); later accesses skip this."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'tmequant' has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API only (plus module dunders); submodules stay importable by name."""
    dunders = [k for k in globals() if k.startswith("__") and k.endswith("__")]
    return sorted(set(__all__) | set(dunders))
