"""Train/validation/test splits by patient, else slide, else file: stratified, no leakage.

All tiles of one group (patient, or slide where patients are unknown) land in one split,
so tiles of one patient never inform both the weights and the validation metric.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from tmequant.errors import InputError
from tmequant.training.labels import LabelSet

log = logging.getLogger("tmequant")

SPLITS = ("train", "val", "test")


def group_key(labels: LabelSet) -> tuple[str, list[str]]:
    """(level, group id per sample): ``patient`` when every sample has a patient id,
    else ``slide`` when slides hold several tiles, else ``file``."""
    s = labels.samples
    if s and all(x.patient_id for x in s):
        return "patient", [str(x.patient_id) for x in s]
    if any(x.patient_id for x in s):
        log.warning("some samples lack a patient_id; splitting by slide instead")
    slide_ids = [x.slide_id for x in s]
    if len(set(slide_ids)) < len(s):
        return "slide", slide_ids
    return "file", [x.key for x in s]


def _class_vector(labels: LabelSet, idx: list[int]) -> np.ndarray:
    pos = {c: i for i, c in enumerate(labels.tissue_classes)}
    v = np.zeros(len(pos) + 1)  # last slot: unlabelled (count-only) tiles
    for i in idx:
        lab = labels.samples[i].label
        v[pos[lab] if lab is not None else -1] += 1
    return v


def split_labels(
    labels: LabelSet, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> list[str]:
    """A split name (train/val/test) per sample; user-given splits are kept.

    Greedy stratified group assignment: groups in a seeded random order (largest first)
    each go to the split that still lacks the largest share of the group's classes, so
    every split's class mix approaches the whole set's. Deterministic for a given seed.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise InputError(
            f"val_fraction {val_fraction} + test_fraction {test_fraction} must be "
            "in [0, 1) each and sum below 1"
        )
    given = [s.split for s in labels.samples]
    level, groups = group_key(labels)
    if level == "file" and (val_fraction or test_fraction) and len(groups) > 1:
        log.warning(
            "no patient or slide ids: splitting by file, so tiles of one patient may "
            "land in two splits (give patient_id in a CSV manifest to prevent it)"
        )
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out: list[str | None] = list(given)
    # A group with a user-given split anywhere takes that split for all its tiles.
    for g, idx in members.items():
        gs = {str(given[i]) for i in idx if given[i]}
        if len(gs) > 1:
            raise InputError(f"{level} {g!r} is given more than one split ({sorted(gs)}): leakage")
        if gs:
            split = gs.pop()
            for i in idx:
                out[i] = split
    free = [g for g, idx in members.items() if out[idx[0]] is None]
    if free:
        fracs = {
            "train": 1 - val_fraction - test_fraction,
            "val": val_fraction,
            "test": test_fraction,
        }
        active = [s for s in SPLITS if fracs[s] > 0]
        total = np.sum([_class_vector(labels, members[g]) for g in free], axis=0)
        target = {s: fracs[s] * total for s in active}
        have = {s: np.zeros_like(total) for s in active}
        rng = np.random.default_rng(seed)
        order = [free[i] for i in rng.permutation(len(free))]
        order.sort(key=lambda g: -len(members[g]))  # stable: ties keep the random order
        for g in order:
            v = _class_vector(labels, members[g])
            scores = []
            for s in active:
                lack = np.clip(target[s] - have[s], 0, None) / np.maximum(target[s], 1e-9)
                # ties (e.g. classes seen once) go to the split lacking most tiles overall
                overall = max(float(target[s].sum() - have[s].sum()), 0.0) / max(
                    float(target[s].sum()), 1e-9
                )
                scores.append(float((lack * v).sum() / max(v.sum(), 1)) + 1e-3 * overall)
            s = active[int(np.argmax(scores))]
            have[s] += v
            for i in members[g]:
                out[i] = s
        if val_fraction > 0 and len(free) >= 2 and "val" not in out:
            # A tiny set: move the smallest group so early stopping has something to watch.
            g = min(free, key=lambda g: len(members[g]))
            for i in members[g]:
                out[i] = "val"
    result = [str(s) for s in out]
    check_no_leakage(labels, result)
    log.info("split by %s: %s", level, {s: result.count(s) for s in SPLITS if s in result})
    return result


def check_no_leakage(labels: LabelSet, splits: list[str]) -> None:
    """InputError when a patient (or, lacking patients, a slide) falls into two splits."""
    for attr in ("patient_id", "slide_id"):
        where: dict[str, set[str]] = {}
        for s, sp in zip(labels.samples, splits):
            gid = getattr(s, attr)
            if gid:
                where.setdefault(str(gid), set()).add(sp)
        bad = sorted(g for g, sps in where.items() if len(sps) > 1)
        if bad:
            raise InputError(f"{attr.removesuffix('_id')}s {bad[:5]} fall into more than one split")
        if attr == "patient_id" and where:
            return  # patients decide; a slide id can repeat across patients


def write_split_csv(path: str | Path, labels: LabelSet, splits: list[str]) -> Path:
    """``split.csv``: key,path,label,slide_id,patient_id,split (one row per tile)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "path", "label", "slide_id", "patient_id", "split"])
        for s, sp in zip(labels.samples, splits):
            w.writerow([s.key, s.path, s.label or "", s.slide_id, s.patient_id or "", sp])
    tmp.replace(p)
    return p


def read_split_csv(path: str | Path, labels: LabelSet) -> list[str]:
    """The splits of a previous run, by sample key (InputError if the data changed)."""
    p = Path(path)
    with open(p, encoding="utf-8") as fh:
        by_key = {row["key"]: row["split"] for row in csv.DictReader(fh)}
    missing = [s.key for s in labels.samples if s.key not in by_key]
    if missing:
        raise InputError(
            f"{len(missing)} tiles (e.g. {missing[0]!r}) are not in the saved split; "
            "the data changed since training started (start a new --out)",
            p,
        )
    return [by_key[s.key] for s in labels.samples]
