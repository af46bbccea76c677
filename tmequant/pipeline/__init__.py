"""The batch pipeline behind ``tmequant run``: tile -> predict -> count -> biomarkers -> report.

Every slide goes through the same stages; each stage is skipped when its completion marker
and parameter hash say it is done, so a rerun after a kill (or with more slides) redoes only
unfinished work, slide by slide and stage by stage. One failing slide never stops the
others; its stage and one-line reason go to ``failures.csv``. The cohort outputs are
assembled at the end from every finished slide. With a Dask ``distributed`` client the
per-slide stages run on the cluster's workers (the predict stage on workers that declare a
``GPU`` resource, when there are any) and the cohort outputs are written by the client; the
cohort table is byte-identical to a serial run.

Output folder layout (``--out DIR``)::

    DIR/
      cohort.csv, cohort.parquet    one row per finished slide: biomarkers, provenance, parameters
                                    (rows sorted by slide id; store_path relative to DIR)
      tls.csv, tls.parquet          one row per tertiary lymphoid structure of every slide
      report.html                   self-contained HTML report (tables, pictures, failures)
      failures.csv                  slide_id, stage, reason of every failed slide (header only
                                    when none failed); rewritten by every run
      figures/<slide_id>/*.png      thumbnail, tissue classes, lymphocyte density, compartments
      figures/<slide_id>/figures.json   what the pictures show (slide result + cohort colour
                                    scale): unchanged pictures are not redrawn by a rerun
      slides/<slide_id>.html        per-slide pages (only for cohorts over 40 slides)
      stores/<slide_id>.zarr        the slide store: tiles, predictions/<model>, nuclei
                                    (docs/store-layout.md)
      stores/<slide_id>.qc.png      tiling QC: thumbnail, tissue outline, kept tiles
      results/<slide_id>/
        biomarkers.json             the slide's biomarker row (units in key names)
        tls.csv, tls.parquet        the slide's TLS table
        arrays.npz                  per-tile densities and compartment maps (for the report)
        <slide_id>.geojson.zip      QuPath objects (one <slide_id>.geojson inside; QuPath's
                                    File > Import objects reads .zip directly, not .gz): tiles
                                    (class probabilities and counts as measurements), tumour
                                    bulk, invasive margin and TLS annotations
        done.json                   completion marker of the biomarker stage (its inputs hash)
      run.json                      the last run's settings and provenance
      .tmequant.lock(.json)         the output-folder lock and who holds it

Every file is written under a temporary name and renamed into place (:mod:`tmequant.atomic`),
so a kill never leaves a half file that looks finished; zarr groups carry their own
completion markers.

The modules, each importing only those above it:

    config            RunConfig, SlideRun, RunResult; tiling and counter settings
    results           results/<slide_id>/: write and read back, done.json marker
    stages            the stages of one slide (run_slide), the model once per process
    outdir            the output-folder lock and the checks before any work
    figures           pictures reused while their slide result and colour scale hold
    distributed       the stages as Dask tasks
    driver            run_batch
    biomarker_tables  write_biomarker_tables (``tmequant biomarkers``)
"""

from tmequant.atomic import atomic_write_bytes, atomic_write_text
from tmequant.pipeline.biomarker_tables import write_biomarker_tables
from tmequant.pipeline.config import RunConfig, RunResult, SlideRun, resolve_tiling_params
from tmequant.pipeline.distributed import dask_client
from tmequant.pipeline.driver import run_batch
from tmequant.pipeline.figures import FigurePlan
from tmequant.pipeline.outdir import OutputLockedError, output_lock
from tmequant.pipeline.results import load_slide_result, write_slide_result
from tmequant.pipeline.stages import _reader_processes as _reader_processes  # tests
from tmequant.pipeline.stages import find_cell_table, get_model, run_slide
from tmequant.progress import BatchProgress
from tmequant.qupath.export import slide_features, write_slide_geojson

__all__ = [
    "BatchProgress",
    "FigurePlan",
    "OutputLockedError",
    "RunConfig",
    "RunResult",
    "SlideRun",
    "atomic_write_bytes",
    "atomic_write_text",
    "dask_client",
    "find_cell_table",
    "get_model",
    "load_slide_result",
    "output_lock",
    "resolve_tiling_params",
    "run_batch",
    "run_slide",
    "slide_features",
    "write_biomarker_tables",
    "write_slide_geojson",
    "write_slide_result",
]
