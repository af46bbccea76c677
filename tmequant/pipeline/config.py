"""What a run is given and what it gives: RunConfig, SlideRun, RunResult, and the settings.

``resolve_tiling_params`` layers the tiles of a run (the model card's, then a parameters
file's ``[tiling]`` section, then explicit values such as ``--mpp``/``--tile-px``);
``check_model_tiling`` refuses tiles the model was not made for; ``counter_params`` turns
``counter=`` of :func:`tmequant.pipeline.run_batch` into nucleus-counter parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tmequant.batch import Failure
from tmequant.biomarkers import BiomarkerParams
from tmequant.errors import InputError
from tmequant.inputs import SlideSpec
from tmequant.params import dataclass_from_mapping, load_params_file
from tmequant.tiling.tile import TilingParams

#: The stages of one slide, in order.
STAGES = ("cells", "tile", "predict", "count", "biomarkers")


@dataclass(frozen=True)
class RunConfig:
    """Everything a worker needs to process one slide (picklable, no open handles).

    model: a model name or folder path (loaded once per process). counter: nucleus-counter
    parameters or None when the counter is off. cells_dir: folder of ``<slide_id>.<ext>``
    cell tables or None. workers: reader threads per slide (tiling and counting).
    """

    out_dir: str
    model: str
    tiling: TilingParams = field(default_factory=TilingParams)
    params: BiomarkerParams = field(default_factory=BiomarkerParams)
    counter: Any = None  # tmequant.inference.nuclei.NucleusCounterParams | None
    cells_dir: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    runtime: str = "auto"  # inference runtime: auto | torch | onnx
    workers: int | None = None
    overwrite: bool = False
    geojson_suffix: str = ".geojson.zip"  # ".geojson.zip", ".geojson" or ".geojson.gz"

    @property
    def stores_dir(self) -> Path:
        return Path(self.out_dir) / "stores"

    def result_dir(self, slide_id: str) -> Path:
        return Path(self.out_dir) / "results" / slide_id


@dataclass
class SlideRun:
    """One slide's way through the stages; passed from stage to stage (and worker to client).

    stages: stage -> "done" (computed now) or "skipped" (finished earlier, reused).
    seconds: stage -> wall time; tiles_per_s: stage -> rate of the work done now.
    failure: the first failure, after which the remaining stages are not run.
    result: the slide's BiomarkerResult once the biomarkers stage finished.
    """

    spec: SlideSpec
    store_path: str | None = None
    model_name: str | None = None
    n_tiles: int | None = None
    stages: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tiles_per_s: dict[str, float] = field(default_factory=dict)
    failure: Failure | None = None
    result: Any = None
    cell_table: str | None = None
    notes: tuple[str, ...] = ()
    workers: dict[str, str] = field(default_factory=dict)  # Dask: stage -> worker address
    why: dict[str, str] = field(default_factory=dict)  # stage -> why it was skipped (shown)
    result_hash: str | None = None  # inputs hash of the biomarker stage (names its outputs)

    @property
    def slide_id(self) -> str:
        return self.spec.slide_id

    @property
    def ok(self) -> bool:
        return self.failure is None and self.result is not None


@dataclass
class RunResult:
    """What :func:`run_batch` wrote: cohort tables, report, per-slide runs and failures."""

    out_dir: Path
    slides: dict[str, SlideRun]
    failures: list[Failure]
    cohort_csv: Path | None = None
    cohort_parquet: Path | None = None
    tls_csv: Path | None = None
    report_html: Path | None = None
    failures_csv: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def outcomes(self) -> list[SlideRun]:
        return [r for r in self.slides.values() if r.ok]


def counter_params(counter: Any) -> Any:
    """True -> default NucleusCounterParams; False/None/"off" -> None; params pass through."""
    if counter is None or counter is False or counter == "off":
        return None
    # skimage comes with the counter: loaded only when a run counts nuclei
    from tmequant.inference.nuclei import NucleusCounterParams

    if counter is True or counter == "on":
        return NucleusCounterParams()
    if isinstance(counter, NucleusCounterParams):
        return counter.validate() if counter.enabled else None
    raise InputError(f"counter must be on/off or NucleusCounterParams, got {counter!r}")


def resolve_tiling_params(card: Any, params_file: str | os.PathLike[str] | None = None,
                          overrides: Mapping[str, Any] | None = None) -> TilingParams:
    """The tiles ``tmequant run`` makes: the model card's MPP and tile size, then the
    ``[tiling]`` section of ``params_file`` (TOML/YAML), then ``overrides`` (TilingParams
    field -> value, e.g. ``{"target_mpp_um": 0.5, "tile_px": 224}``; None values are left out).

    card: a :class:`tmequant.ModelCard` (``load_model(name).card``). ParamsError for a bad
    section, InputError for a value out of range.
    """
    base = TilingParams(target_mpp_um=card.mpp_um, tile_px=card.tile_px)
    sections = load_params_file(params_file) if params_file is not None else {}
    if "tiling" in sections:
        base = dataclass_from_mapping(TilingParams, sections["tiling"], params_file or "<params>",
                                      "tiling", base=base)
    try:
        return replace(base, **{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValueError as e:
        raise InputError(str(e)) from None


def check_model_tiling(card: Any, tiling: TilingParams, model: str) -> None:
    """Refuse tiles the model was not made for, before any slide is tiled."""
    problems = []
    if card.tile_px != tiling.tile_px:
        problems.append(f"tile_px {tiling.tile_px} (model wants {card.tile_px})")
    if abs(card.mpp_um - tiling.target_mpp_um) > 0.01 * card.mpp_um:
        problems.append(f"{tiling.target_mpp_um:g} um/px (model wants {card.mpp_um:g})")
    if problems:
        raise InputError(f"model {model!r} does not fit {' and '.join(problems)}; leave --mpp "
                         f"and --tile-px out to use the model's (--mpp {card.mpp_um:g} "
                         f"--tile-px {card.tile_px})")


__all__ = ["STAGES", "RunConfig", "RunResult", "SlideRun", "check_model_tiling", "counter_params",
           "resolve_tiling_params"]
