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
    tile_px: int = Field(default=224, gt=0, le=8192, description="input tile side in pixels")
    mpp_um: float = Field(default=0.5, gt=0, le=100, description="microns per pixel of the input tiles")
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
        return self

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
