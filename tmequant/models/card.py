"""The model card: everything needed to run a network on a slide store and read its output.

A model is a folder holding ``model.safetensors`` and ``model.json`` (this card). The card
names the timm architecture, the input geometry (``tile_px`` at ``mpp_um``), the input
normalisation, the tissue classes (and optional cell classes for a count head), and maps
every class to a role of :mod:`tmequant.roles`, so biomarkers never depend on one model's
class names. Validation errors always name the offending field.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tmequant.defaults import MPP_UM, TILE_PX
from tmequant.domain import (  # noqa: F401 - re-exported: the card's domain helpers
    DOMAIN_SYNTHETIC,
    DOMAIN_UNKNOWN,
    DOMAIN_UNTRAINED,
    NOT_FOR_REAL_TISSUE,
    card_domain,
    count_head_trusted,
    domain_label,
    domain_warning,
)
from tmequant.errors import ModelError
from tmequant.roles import CELL_ROLES, TISSUE_ROLES

CARD_SCHEMA_VERSION = 1
CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
MAX_CARD_BYTES = 16 << 20

# A model name becomes a zarr group name (predictions/<name>) and a folder name.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def _unique_nonblank(values: list[str], field: str) -> list[str]:
    for v in values:
        if not v or v != v.strip():
            raise ValueError(f"{field}: class name {v!r} is blank or has surrounding spaces")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"{field}: duplicate class names {dup}")
    return values


def _check_role_map(
    classes: list[str], roles: dict[str, str], vocab: tuple[str, ...], field: str, cls_field: str
) -> None:
    unknown_cls = sorted(set(roles) - set(classes))
    if unknown_cls:
        raise ValueError(f"{field}: names classes not in {cls_field}: {unknown_cls}")
    unmapped = [c for c in classes if c not in roles]
    if unmapped:
        raise ValueError(f"{field}: classes without a role: {unmapped}")
    bad = {c: r for c, r in roles.items() if r not in vocab}
    if bad:
        raise ValueError(f"{field}: unknown roles {bad}; valid roles are {list(vocab)}")


class StainNormalization(BaseModel):
    """Stain normalisation applied to every tile before the network (training and inference).

    ``stain_matrix``: (2, 3) target optical-density vectors, rows haematoxylin then eosin;
    ``max_concentrations``: (2,) target 99th-percentile H and E concentrations; ``source``:
    the target image (name and sha256). See :mod:`tmequant.models.stain`.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="normalisation method; only 'macenko' is known")
    stain_matrix: list[list[float]] = Field(description="(2, 3) target H and E OD vectors")
    max_concentrations: list[float] = Field(description="(2,) target max H, E concentrations")
    od_threshold: float = Field(default=0.15, gt=0, lt=10, description="background OD cut-off")
    angle_percentile: float = Field(default=1.0, ge=0, lt=50, description="stain angle percentile")
    source: str = Field(default="", description="target image name and sha256")

    @field_validator("method")
    @classmethod
    def _method_known(cls, v: str) -> str:
        if v != "macenko":
            raise ValueError(f"unknown method {v!r}; known: ['macenko']")
        return v

    @field_validator("stain_matrix")
    @classmethod
    def _matrix_ok(cls, v: list[list[float]]) -> list[list[float]]:
        if len(v) != 2 or any(len(r) != 3 for r in v):
            raise ValueError("must be 2 rows (H, E) of 3 OD values (R, G, B)")
        for r in v:
            if not all(math.isfinite(x) for x in r):
                raise ValueError("values must be finite")
            if math.sqrt(sum(x * x for x in r)) < 1e-6:
                raise ValueError("a stain vector is zero")
        return v

    @field_validator("max_concentrations")
    @classmethod
    def _conc_ok(cls, v: list[float]) -> list[float]:
        if len(v) != 2:
            raise ValueError("must be 2 values (H, E)")
        if not all(math.isfinite(x) and x > 0 for x in v):
            raise ValueError("values must be finite and > 0")
        return v

# A detector's tissue classes, derived from its cells (tmequant.models.detector), and roles.
DETECTOR_TISSUE_ROLES: dict[str, str] = {"tumor": "tumor", "stroma": "stroma", "immune": "immune",
                                         "paucicellular": "other_tissue"}


class DetectorSpec(BaseModel):
    """A cell detector's head and post-processing (see :mod:`tmequant.models.detector`).

    The network predicts one centre heatmap per ``cell_classes`` entry at
    ``1/output_stride`` of the input; peaks at least ``min_distance_um`` apart and above the
    class's threshold are cells. Tissue compartments are derived from the cells' composition.
    """

    model_config = ConfigDict(extra="forbid")

    out_indices: list[int] = Field(default_factory=lambda: [0, 1, 2, 3],
                                   description="timm features_only stages used by the decoder")
    output_stride: int = Field(default=2, ge=1, le=8, description="input px per heatmap px")
    decoder_channels: int = Field(default=64, ge=8, le=512, description="decoder width")
    sigma_um: float = Field(default=2.0, gt=0, le=20, description="target Gaussian sigma, um")
    min_distance_um: float = Field(default=3.0, gt=0, le=50,
                                   description="minimum distance between two cell centres, um")
    thresholds: dict[str, float] = Field(default_factory=dict,
                                         description="per cell class: peak score threshold 0-1")
    context_px: int = Field(default=32, ge=0, le=512,
                            description="context read around each tile at inference, input px")
    paucicellular_per_mm2: float = Field(
        default=600.0, gt=0, description="cells/mm^2 below which a tile is paucicellular")
    immune_per_mm2: float = Field(
        default=4000.0, gt=0, description="lymphocytes/mm^2 above which lymphocytes make a tile "
        "immune tissue (lymphoid aggregate) rather than stroma")

    @field_validator("thresholds")
    @classmethod
    def _thr_ok(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not (0.0 < x < 1.0)}
        if bad:
            raise ValueError(f"thresholds must be in (0, 1): {bad}")
        return v


class ModelCard(BaseModel):
    """Model card (``model.json``); see docs/store-layout.md and docs/biomarkers.md.

    >>> card = ModelCard(name="demo", arch="resnet18", tissue_classes=["tum", "str"],
    ...                  tissue_roles={"tum": "tumor", "str": "stroma"})
    >>> card.role_of("tum")
    'tumor'
    """

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)

    schema_version: int = Field(default=CARD_SCHEMA_VERSION, description="card format version")
    name: str = Field(description="model name; also the predictions/<name> group in the store")
    version: str = Field(default="0.1.0", description="model version")
    arch: str = Field(description="timm architecture name, e.g. efficientnet_lite0")
    # Memory grows with tile area: one tile per batch peaks at 1.9 GB (2048 px) and 5.1 GB
    # (4096 px) with efficientnet_lite0 on the CPU; 1024 px keeps any card under 2 GB.
    tile_px: int = Field(default=TILE_PX, gt=0, le=1024, description="input tile side in pixels")
    mpp_um: float = Field(default=MPP_UM, gt=0, le=100, description="microns per pixel of the input tiles")
    mean: tuple[float, float, float] = Field(default=(0.485, 0.456, 0.406), description="RGB mean, 0-1 scale")
    std: tuple[float, float, float] = Field(default=(0.229, 0.224, 0.225), description="RGB std, 0-1 scale")
    tissue_classes: list[str] = Field(min_length=1, description="tissue head classes, in logit order")
    tissue_roles: dict[str, str] = Field(description="tissue class -> role in tmequant.roles.TISSUE_ROLES")
    cell_classes: list[str] = Field(default_factory=list, description="count head classes (may be empty)")
    cell_roles: dict[str, str] = Field(default_factory=dict, description="cell class -> role in CELL_ROLES")
    description: str = ""
    license: str = "unknown"
    training: dict[str, Any] = Field(default_factory=dict, description="training provenance")
    metrics: dict[str, Any] = Field(default_factory=dict, description="evaluation metrics")
    stain_normalization: StainNormalization | None = Field(
        default=None, description="stain normalisation every tile gets before the network")
    detector: DetectorSpec | None = Field(
        default=None, description="cell detector head (heatmaps per cell class) instead of a "
        "tile classifier; tissue classes then come from the cells' composition")
    domain: str | list[str] = Field(
        default=DOMAIN_UNKNOWN,
        description="what the model was trained on: 'synthetic' (phantoms), 'untrained' (random "
        "weights), or the tissues/organs of its training slides, e.g. ['breast carcinoma H&E']; "
        "'unknown' for cards written before the field existed")

    @field_validator("domain")
    @classmethod
    def _domain_ok(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else list(v)
        if not items or any(not isinstance(x, str) or not x.strip() for x in items):
            raise ValueError("domain must be a non-empty text or list of texts")
        return v

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):  # fullmatch: "$" would let a final newline through
            raise ValueError(
                f"name {v!r} must be 1-128 characters of letters, digits, '.', '_', '+', '-' "
                "(it names a folder and a store group)"
            )
        return v

    @field_validator("arch")
    @classmethod
    def _arch_ok(cls, v: str) -> str:
        if not v or v != v.strip():
            raise ValueError("arch must be a timm architecture name")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("std values must be > 0")
        return v

    @field_validator("tissue_classes")
    @classmethod
    def _tissue_unique(cls, v: list[str]) -> list[str]:
        return _unique_nonblank(v, "tissue_classes")

    @field_validator("cell_classes")
    @classmethod
    def _cell_unique(cls, v: list[str]) -> list[str]:
        return _unique_nonblank(v, "cell_classes")

    @model_validator(mode="after")
    def _roles_ok(self) -> ModelCard:
        _check_role_map(self.tissue_classes, self.tissue_roles, TISSUE_ROLES,
                        "tissue_roles", "tissue_classes")
        if self.cell_roles and not self.cell_classes:
            raise ValueError("cell_roles: a count head needs cell_classes, which is empty")
        _check_role_map(self.cell_classes, self.cell_roles, CELL_ROLES, "cell_roles", "cell_classes")
        overlap = sorted(set(self.tissue_classes) & set(self.cell_classes))
        if overlap:
            # role_of() would be ambiguous.
            raise ValueError(f"cell_classes: names also used as tissue classes: {overlap}")
        if self.detector is not None:
            if not self.cell_classes:
                raise ValueError("detector: a cell detector needs cell_classes, which is empty")
            unknown = sorted(set(self.detector.thresholds) - set(self.cell_classes))
            if unknown:
                raise ValueError(f"detector.thresholds: names classes not in cell_classes: {unknown}")
            if self.tissue_classes != list(DETECTOR_TISSUE_ROLES):
                raise ValueError("tissue_classes: a cell detector's tissue classes come from its "
                                 f"cells and must be {list(DETECTOR_TISSUE_ROLES)}")
        return self

    @property
    def is_detector(self) -> bool:
        """True for a cell detector (heatmaps), False for a tile classifier."""
        return self.detector is not None

    # --- helpers ----------------------------------------------------------------------
    @property
    def n_tissue(self) -> int:
        return len(self.tissue_classes)

    @property
    def n_cell(self) -> int:
        return len(self.cell_classes)

    @property
    def has_count_head(self) -> bool:
        return bool(self.cell_classes)

    @property
    def domain_label(self) -> str:
        """The domain as one line of text (a list joined by '; ')."""
        return domain_label(self.domain)

    @property
    def domain_warning(self) -> str | None:
        """A one-line warning when the model's output on real tissue means nothing, else None."""
        return domain_warning(self.name, card_domain(self))

    def role_of(self, class_name: str) -> str:
        """Role of a tissue or cell class (KeyError naming the class if unknown)."""
        if class_name in self.tissue_roles:
            return self.tissue_roles[class_name]
        if class_name in self.cell_roles:
            return self.cell_roles[class_name]
        raise KeyError(f"{class_name!r} is not a class of model {self.name!r}")

    def classes_with_role(self, role: str) -> list[str]:
        """Tissue (or cell) classes mapped to ``role``, in head order."""
        if role in TISSUE_ROLES:
            return [c for c in self.tissue_classes if self.tissue_roles[c] == role]
        if role in CELL_ROLES:
            return [c for c in self.cell_classes if self.cell_roles[c] == role]
        raise KeyError(f"unknown role {role!r}")

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        if d.get("stain_normalization") is None:
            # Cards (and predictions params hashes) of models without it stay as they were.
            d.pop("stain_normalization", None)
        if d.get("detector") is None:
            d.pop("detector", None)  # likewise for tile classifiers
        if d.get("domain") == DOMAIN_UNKNOWN:
            d.pop("domain", None)  # the same: old cards keep their predictions params hash
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike[str] | None = None) -> ModelCard:
        """Validate a dict; errors become one-line ModelError naming the file and field."""
        if not isinstance(data, dict):
            raise ModelError("model card must be a JSON object", None if source is None else str(source))
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ModelError(f"invalid model card: {format_validation_error(e)}",
                             None if source is None else str(source)) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelCard:
        """Read a card from ``model.json`` (or a folder holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / CARD_FILE
        try:
            if p.stat().st_size > MAX_CARD_BYTES:  # a card is a few kB: refuse before reading
                raise ModelError(f"model card is larger than {MAX_CARD_BYTES >> 20} MiB", p)
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError("model card not found", p) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"model card is not valid JSON: {e}", p) from None
        except RecursionError:
            raise ModelError("model card is not valid JSON: nested too deeply", p) from None
        return cls.from_dict(data, p)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the card as JSON to ``path`` (a folder gets ``model.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / CARD_FILE
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, p)
        return p


def format_validation_error(e: ValidationError) -> str:
    """``field: message; field2: message`` from a pydantic error (fields always named)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "missing required field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
