"""Parameter files (TOML or YAML) -> validated config dataclasses.

A file holds sections; top-level scalar keys belong to ``biomarkers``::

    # params.toml
    margin_um = 750            # same as [biomarkers] margin_um = 750
    [nucleus_counter]
    seed_h_od = 0.6

Unknown keys and out-of-range values raise :class:`ParamsError` naming the file and key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from tmequant.errors import ParamsError

T = TypeVar("T")

# the sections something reads: any other is refused (a typo must not fall back to defaults)
SECTIONS = ("biomarkers", "nucleus_counter", "tiling", "qc")
_MAX_PARAMS_BYTES = 1 << 20


def load_params_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a ``.toml`` or ``.yaml``/``.yml`` file -> {section: {key: value}}.

    Top-level non-table keys go to the ``biomarkers`` section.
    """
    p = Path(path)
    if not p.is_file():
        raise ParamsError("no such parameters file", p)
    if p.stat().st_size > _MAX_PARAMS_BYTES:  # a few keys: anything this big is a wrong file
        raise ParamsError(f"parameters file is larger than {_MAX_PARAMS_BYTES >> 20} MiB", p)
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, packaged (pyproject: tomli)
                import tomli as tomllib  # type: ignore[no-redef]

            with open(p, "rb") as fh:
                data = tomllib.load(fh)
        elif suffix in (".yaml", ".yml"):
            import yaml

            with open(p, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        else:
            raise ParamsError("unknown parameters format: use .toml or .yaml", p)
    except ParamsError:
        raise
    except Exception as e:  # noqa: BLE001 - TOMLDecodeError, YAMLError, UnicodeDecodeError
        raise ParamsError(f"cannot parse: {' '.join(str(e).split())[:200]}", p) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError("top level must be a table of keys", p)
    out: dict[str, dict[str, Any]] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            # a misspelt section ([biomarker], [Biomarkers]) would be ignored: refuse it
            if str(k) not in SECTIONS:
                raise ParamsError(f"unknown section [{k}] (known sections: "
                                  f"{', '.join(f'[{x}]' for x in SECTIONS)})", p)
            out.setdefault(str(k), {}).update(v)
        else:
            out.setdefault("biomarkers", {})[str(k)] = v
    return out


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` to the field type ``tp`` (int/float/bool/str, Optional thereof)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0] if len(args) == 1 else tp
    if tp is bool or tp == "bool":
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{key} = {value!r}: expected true or false", source)
    if tp in (float, "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} = {value!r}: expected a number", source)
        return float(value)
    if tp in (int, "int"):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ParamsError(f"{key} = {value!r}: expected an integer", source)
        return int(value)
    if tp in (str, "str"):
        if not isinstance(value, str):
            raise ParamsError(f"{key} = {value!r}: expected a string", source)
        return value
    if typing.get_origin(tp) in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(value) if typing.get_origin(tp) is tuple else list(value)
    return value


def dataclass_from_mapping(cls: type[T], mapping: Mapping[str, Any] | None,
                           source: str | os.PathLike[str] = "<params>", section: str | None = None,
                           base: T | None = None) -> T:
    """Build ``cls`` from ``mapping``, refusing unknown keys and bad values with ParamsError.

    ``base`` (an instance) supplies the values the mapping leaves out (default: cls()).
    The dataclass's own checks (``__post_init__``/``validate`` raising ValueError or
    ParamsError) run too, and their message is re-raised naming ``source``.
    """
    src = str(source)
    where = f"[{section}] " if section else ""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ParamsError(f"{where}unknown key {unknown[0]!r} (valid: {', '.join(sorted(names))})", src)
    values = {k: _coerce(v, hints.get(k, Any), f"{where}{k}", src) for k, v in mapping.items()}
    try:
        obj = dataclasses.replace(base, **values) if base is not None else cls(**values)  # type: ignore[type-var]
        validate = getattr(obj, "validate", None)
        if callable(validate):
            res = validate()
            obj = res if isinstance(res, cls) else obj
    except ParamsError as e:
        raise ParamsError(f"{where}{e.message}".replace(f"{where}{where}", where), src) from None
    except (ValueError, TypeError) as e:
        raise ParamsError(f"{where}{e}", src) from None
    return obj


def biomarker_params_from_file(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None):
    """BiomarkerParams from the ``biomarkers`` section of ``path`` (if any), then ``overrides``
    (e.g. command-line flags; None values ignored)."""
    from tmequant.biomarkers.params import BiomarkerParams

    sections = load_params_file(path) if path is not None else {}
    params = dataclass_from_mapping(BiomarkerParams, sections.get("biomarkers", {}),
                                    path or "<params>", "biomarkers")
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if ov:
        params = dataclass_from_mapping(BiomarkerParams, ov, "command line", None, base=params)
    return params


def nucleus_counter_params_from_file(path: str | os.PathLike[str] | None):
    """NucleusCounterParams from the ``nucleus_counter`` section (None when the module is absent)."""
    try:
        from tmequant.inference.nuclei import NucleusCounterParams
    except ImportError:
        return None
    sections = load_params_file(path) if path is not None else {}
    return dataclass_from_mapping(NucleusCounterParams, sections.get("nucleus_counter", {}),
                                  path or "<params>", "nucleus_counter")
