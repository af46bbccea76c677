"""A self-contained HTML report for a cohort: one file, viewable offline.

Pictures are embedded as base64 ``data:`` URIs; CSS and the one script (table sorting and a
load self-check) are inline; nothing is fetched. A Content-Security-Policy allows only data
images, inline styles and *this* script (by its sha256), so even a slide property that
escaped escaping could not run script. All slide text goes through :func:`html.escape`.

Self-check (used by the tests, harmless for users): after ``load`` the script sets
``<body data-images-ok="true|false" data-errors="N" data-ready="1">``; ``data-errors``
counts uncaught script errors, resource errors, CSP violations and ``console.error`` calls.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tmequant.atomic import atomic_write_text
from tmequant.provenance import canonical_json, package_version
from tmequant.report.glossary import (
    SUMMARY_COLUMNS,
    TERMS,
    format_cell,
    format_value,
    phenotype_reason,
    term,
)
from tmequant.report.tables import cohort_frame, column_kind, flatten_row

if TYPE_CHECKING:
    import pandas as pd

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What a pathologist reads first; the cohort table shows these (when present) before the rest.
KEY_COLUMNS: tuple[str, ...] = (
    "immune_phenotype",
    "til_density_intratumoral_per_mm2",
    "til_density_stromal_per_mm2",
    "stil_score_pct",
    "exclusion_ratio_stroma_to_tumor",
    "exclusion_ratio_margin_to_core",
    "tls_count",
    "tls_per_mm2",
    "tumor_stroma_ratio",
    "bulk_area_mm2",
    "tissue_area_mm2",
)


@dataclass
class SlideSection:
    """What the report shows for one slide.

    slide_id: the slide's id (any text; escaped).
    row: the slide's cohort row (biomarkers, provenance, ``param_*``; nested ``params`` allowed).
    figures: caption -> PNG bytes or path to a PNG, shown in this order.
    params: the biomarker parameters used (shown as a table; defaults to the row's ``param_*``).
    provenance: provenance fields (defaults to the row's provenance columns).
    notes: optional lines shown under the slide heading (warnings such as "MPP overridden").
    """

    slide_id: str
    row: Mapping[str, Any]
    figures: Mapping[str, bytes | str | os.PathLike[str]] = field(default_factory=dict)
    params: Mapping[str, Any] | None = None
    provenance: Mapping[str, Any] | None = None
    notes: Sequence[str] = ()


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _sort_key(v: Any) -> str:
    """The ``data-v`` sort value: a number as repr (inf allowed), else text; '' sorts last."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"  # what JavaScript's parseFloat reads
    if isinstance(v, (int, float)):
        return repr(v)
    return str(v)


MAX_FIGURE_WIDTH_PX = 900  # shown at most this wide (click-free full size would be 1:1)


def _png_bytes(fig: bytes | str | os.PathLike[str]) -> bytes:
    data = bytes(fig) if isinstance(fig, (bytes, bytearray)) else Path(fig).read_bytes()
    if data[:8] != PNG_SIGNATURE or len(data) < 24:
        raise ValueError(f"figure is not a PNG: {fig if not isinstance(fig, bytes) else 'bytes'}")
    return data


# Pictures are embedded as lossy WebP: a 900 px figure over a slide thumbnail is ~1 MB as
# PNG and ~60-120 kB as WebP at this quality, with legends and labels still crisp, so a slide
# costs well under 500 kB of HTML. Every browser of the last five years shows WebP.
IMAGE_MIME = "image/webp"
WEBP_QUALITY = 75


def embedded_image(data: bytes) -> bytes:
    """A PNG re-encoded as WebP (RGB, quality :data:`WEBP_QUALITY`) for embedding."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="WEBP", quality=WEBP_QUALITY, method=4)
    return buf.getvalue()


def _img_tag(fig: bytes | str | os.PathLike[str], alt: str) -> str:
    """An <img> with the picture inline (WebP) and its display size fixed from the PNG header
    (explicit sizes keep the layout stable and the labels legible)."""
    data = _png_bytes(fig)
    w_px, h_px = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    scale = min(1.0, MAX_FIGURE_WIDTH_PX / max(w_px, 1))
    uri = f"data:{IMAGE_MIME};base64," + base64.b64encode(embedded_image(data)).decode("ascii")
    return (f'<img src="{uri}" width="{round(w_px * scale)}" height="{round(h_px * scale)}" '
            f'alt="{_e(alt)}">')


_CSS = """
:root{--fg:#1d1d1f;--muted:#666;--line:#d9d9de;--head:#f3f3f6;--accent:#8b1e3f}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);margin:0;padding:0 24px 48px;background:#fff}
header{border-bottom:3px solid var(--accent);padding:18px 0 10px;margin-bottom:16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 6px;padding-top:8px;border-top:1px solid var(--line)}
h3{font-size:14px;margin:14px 0 6px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.meta{color:var(--muted);font-size:13px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:right;white-space:nowrap;vertical-align:top}
th{background:var(--head);position:sticky;top:0}
td.text,th.text{text-align:left}
#cohort-table td:first-child,#cohort-table th:first-child{position:sticky;left:0;background:#fff;z-index:1}
#cohort-table th:first-child{background:var(--head);z-index:2}
table.sortable th button{all:unset;cursor:pointer;font-weight:600}
table.sortable th button::after{content:" \\2195";color:#aaa}
table.sortable th[aria-sort=ascending] button::after{content:" \\2191";color:var(--accent)}
table.sortable th[aria-sort=descending] button::after{content:" \\2193";color:var(--accent)}
tbody tr:nth-child(even){background:#fafafb}
.kv td:first-child{text-align:left;color:var(--muted);font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.kv td:last-child{text-align:left;white-space:normal;word-break:break-all;max-width:60ch}
.figs{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid var(--line);padding:6px;background:#fff;max-width:100%}
figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:12.5px;color:var(--muted);margin-top:4px}
.cols{display:flex;flex-wrap:wrap;gap:24px}
.failures td{white-space:normal}
.ok{color:#2a7a2a}.bad{color:#b00020}
.note{background:#fff6e0;border-left:3px solid #e0a000;padding:4px 8px;margin:4px 0}
.banner{background:#fde8ec;border:2px solid #b00020;color:#6b0014;padding:8px 12px;margin:8px 0;font-weight:600}
.qc{background:#fff1e0;border-left:3px solid #d66a00;padding:4px 8px;margin:4px 0}
.qc ul{margin:2px 0;padding-left:20px}
th .unit{display:block;font-weight:400;color:var(--muted);font-size:11.5px}
th{white-space:normal;vertical-align:bottom;max-width:11em}
td.wrap{white-space:normal;min-width:11em;max-width:20em;text-align:left}
td .why{display:block;color:var(--muted);font-size:11.5px}
td.flag{color:#b34a00;font-weight:600;white-space:nowrap;text-align:left;font-size:11.5px}
table.sortable th button::after{font-size:10px}
dl.glossary{font-size:12.5px;color:var(--muted);display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:10px 0}
dl.glossary dt{font-weight:600;color:var(--fg)}dl.glossary dd{margin:0}
.phenotype{font-size:15px;margin:6px 0}
details{margin:10px 0}summary{cursor:pointer;color:var(--accent)}
.measures td:first-child{text-align:left}.measures td.name{font-family:ui-monospace,"DejaVu Sans Mono",monospace;color:var(--muted);text-align:left;font-size:11.5px}
"""

# Sorting: numbers numerically (data-v holds the raw value), text by locale; empty always last.
_JS = """
(function(){
  var errors=0;
  function bump(){errors++;if(document.body)document.body.setAttribute('data-errors',String(errors));}
  window.addEventListener('error',bump,true);
  document.addEventListener('securitypolicyviolation',bump);
  var ce=console.error;console.error=function(){bump();return ce.apply(console,arguments);};
  function cmp(a,b,num){
    if(a===''&&b==='')return 0; if(a==='')return 1; if(b==='')return -1;
    if(num){var x=parseFloat(a),y=parseFloat(b);return x<y?-1:x>y?1:0;}
    return a.localeCompare(b,undefined,{numeric:true});
  }
  function sortBy(table,col,th){
    var asc=th.getAttribute('aria-sort')!=='ascending';
    table.querySelectorAll('th[aria-sort]').forEach(function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',asc?'ascending':'descending');
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    var vals=rows.map(function(r){return r.cells[col].getAttribute('data-v')||'';});
    var num=vals.every(function(v){return v===''||!isNaN(parseFloat(v));});
    var idx=rows.map(function(r,i){return i;});
    idx.sort(function(i,j){
      var c=cmp(vals[i],vals[j],num);
      if(vals[i]!==''&&vals[j]!=='')c=asc?c:-c;
      return c||i-j;
    });
    idx.forEach(function(i){body.appendChild(rows[i]);});
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th,col){
      var b=th.querySelector('button'); if(b)b.addEventListener('click',function(){sortBy(table,col,th);});
    });
  });
  window.addEventListener('load',function(){
    var imgs=Array.prototype.slice.call(document.images);
    var ok=imgs.every(function(i){return i.complete&&i.naturalWidth>0;});
    document.body.setAttribute('data-images-ok',ok?'true':'false');
    document.body.setAttribute('data-images',String(imgs.length));
    document.body.setAttribute('data-errors',String(errors));
    document.body.setAttribute('data-ready','1');
  });
})();
""".strip()


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def _cell(v: Any, text: bool = False, column: str | None = None) -> str:
    cls = ' class="text"' if text or isinstance(v, str) else ""
    shown = format_value(v) if column is None else format_cell(column, v)
    return f'<td{cls} data-v="{_e(_sort_key(v))}">{_e(shown)}</td>'


def _flags(value: Any) -> list[str]:
    """The ``code: reason`` items of a ``qc_flags`` cell."""
    if not isinstance(value, str) or not value.strip():
        return []
    return [f.strip() for f in value.split("; ") if f.strip()]


def _qc_cell(value: Any) -> str:
    flags = _flags(value)
    if not flags:
        return '<td class="text ok" data-v="0">ok</td>'
    codes = "<br>".join(_e(f.split(":", 1)[0]) for f in flags)
    return (f'<td class="text flag" data-v="{len(flags)}" title="{_e(chr(10).join(flags))}">'
            f"⚠ {len(flags)}<br>{codes}</td>")


def _qc_block(value: Any) -> str:
    flags = _flags(value)
    if not flags:
        return ""
    items = "".join(f"<li><b>{_e(f.split(': ', 1)[0])}</b>: {_e(f.split(': ', 1)[-1])}</li>" for f in flags)
    return f'<div class="qc"><b>QC flags</b> (check before trusting the numbers)<ul>{items}</ul></div>'


def _glossary_html(columns: Sequence[str], vmax: float | None) -> str:
    items = []
    for c in ("qc_flags", *columns):
        t = term(c)
        if t.definition:
            unit = f" ({t.unit})" if t.unit else ""
            items.append(f"<dt>{_e(t.label)}{_e(unit)}</dt><dd>{_e(t.definition)}</dd>")
    scale = ""
    if vmax is not None and math.isfinite(vmax):
        scale = (f'<p class="meta">Colour scale: every lymphocyte-density picture of this cohort '
                 f"uses the same scale, 0 to {vmax:,.0f} lymphocytes/mm² of tissue (the cohort's 99th "
                 "percentile, at least 100); darker is denser.</p>")
    return f'<dl class="glossary">{"".join(items)}</dl>{scale}'


def _measures_table(biom: Mapping[str, Any]) -> str:
    """Every biomarker of a slide: label, unit, value in its column's format, raw column name."""
    if not biom:
        return '<p class="meta">none recorded</p>'
    known = [k for k in TERMS if k in biom] + [k for k in biom if k not in TERMS]
    rows = []
    for k in known:
        t = term(k)
        rows.append(f'<tr title="{_e(t.definition)}"><td>{_e(t.label)}</td><td class="text">{_e(t.unit)}</td>'
                    f"<td>{_e(format_cell(k, biom[k]))}</td><td class=\"name\">{_e(k)}</td></tr>")
    return ('<table class="measures"><thead><tr><th class="text">measure</th><th class="text">unit</th>'
            '<th>value</th><th class="text">column</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def _kv_table(items: Mapping[str, Any]) -> str:
    if not items:
        return '<p class="meta">none recorded</p>'
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(v if isinstance(v, str) else _kv_value(v))}</td></tr>"
        for k, v in items.items()
    )
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _kv_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # parameters and provenance exactly, not rounded for display
    if isinstance(v, (dict, list, tuple)):
        return canonical_json(v)
    return str(v)


def _failure_fields(f: Any) -> tuple[str, str, str]:
    if isinstance(f, Mapping):
        return (str(f.get("slide_id", f.get("item_id", ""))), str(f.get("stage", "")),
                str(f.get("reason", "")))
    return (str(getattr(f, "item_id", getattr(f, "slide_id", ""))), str(getattr(f, "stage", "")),
            str(getattr(f, "reason", "")))


def _failures_html(failures: Sequence[tuple[str, str, str]]) -> str:
    out = ['<section id="failures"><h2>Failures</h2>']
    if failures:
        out.append('<table class="failures sortable" id="failures-table"><thead><tr>')
        out += [f'<th class="text" scope="col"><button type="button">{h}</button></th>'
                for h in ("slide", "stage", "reason")]
        out.append("</tr></thead><tbody>")
        out += [f"<tr>{_cell(sid, True)}{_cell(stage, True)}{_cell(reason, True)}</tr>"
                for sid, stage, reason in failures]
        out.append("</tbody></table>")
    else:
        out.append('<p class="ok">No slide failed.</p>')
    out.append("</section>")
    return "".join(out)


def render_html_report(
    slides: Sequence[SlideSection],
    failures: Iterable[Any] | None = (),
    *,
    title: str = "tmequant cohort report",
    table_columns: Sequence[str] | None = None,
    generated_at: str | None = None,
    slide_links: Mapping[str, str] | None = None,
    back_link: str | None = None,
    banners: Sequence[str] = (),
    density_vmax_per_mm2: float | None = None,
) -> str:
    """The report as one HTML string.

    failures: :class:`tmequant.batch.Failure` objects or dicts with slide_id/stage/reason
    (None: no failures section, as on a per-slide page).
    table_columns: biomarker columns of the cohort table (default: every biomarker column,
    :data:`KEY_COLUMNS` first).
    generated_at: a timestamp to print (left out when None, so reruns give identical files).
    slide_links: slide id -> relative href of the slide's own page. Given, the table links
    there and the slides get no section here (a large cohort: one light page per slide).
    back_link: relative href shown as "back to the cohort" (on a per-slide page).
    banners: warnings shown in red at the top (a synthetic or untrained model).
    density_vmax_per_mm2: top of the cohort's shared lymphocyte-density colour scale (stated).
    The cohort table shows :data:`tmequant.report.glossary.SUMMARY_COLUMNS` with human labels,
    units and definitions (hover, and footnotes); each slide's section shows every measure.
    """
    show_failures = failures is not None
    failures = [_failure_fields(f) for f in failures or ()]
    rows = [{**s.row, "slide_id": s.slide_id} for s in slides]
    df = cohort_frame(rows) if rows else None
    if table_columns is None:
        have = [str(c) for c in (df.columns if df is not None else [])]
        table_columns = [c for c in SUMMARY_COLUMNS if c in have]
    ordered = sorted(slides, key=lambda s: str(s.slide_id))
    hrefs = {s.slide_id: f"#slide-{i}" for i, s in enumerate(ordered)}
    if slide_links is not None:
        hrefs.update({str(k): v for k, v in slide_links.items()})

    out: list[str] = []
    w = out.append
    _write_page_head(w, title, len(slides), len(failures) if show_failures else None,
                     generated_at, back_link, banners)
    _write_cohort_section(w, df, table_columns, hrefs, density_vmax_per_mm2)
    if show_failures:
        w(_failures_html(failures))
    for s in ordered:
        if not hrefs[s.slide_id].startswith("#"):
            continue  # it has its own page
        _write_slide_section(w, s, hrefs[s.slide_id], banners)

    w(f"<script>{_JS}</script></body></html>\n")
    return "".join(out)


def _write_page_head(
    w: Callable[[str], None],
    title: str,
    n_slides: int,
    n_failed: int | None,
    generated_at: str | None,
    back_link: str | None,
    banners: Sequence[str],
) -> None:
    """The document head, the page header (counts, version, timestamp) and the banners;
    n_failed None: no failure count (no failures section)."""
    w("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
    w(f'<meta http-equiv="Content-Security-Policy" content="{_e(_csp(_JS))}">')
    w('<meta name="viewport" content="width=device-width, initial-scale=1">')
    w(f"<title>{_e(title)}</title><style>{_CSS}</style></head>")
    w('<body data-ready="0">')
    meta = f"{n_slides} slide(s) analysed"
    if n_failed is not None:
        meta += f", {n_failed} failed"
    meta += f" · tmequant {_e(package_version())}"
    if generated_at:
        meta += f" · {_e(generated_at)}"
    back = f' · <a href="{_e(back_link)}">back to the cohort</a>' if back_link else ""
    w(f'<header><h1>{_e(title)}</h1><div class="meta">{meta}{back}</div></header>')
    for b in banners:
        w(f'<div class="banner" role="alert">WARNING: {_e(b)}</div>')


def _write_cohort_section(
    w: Callable[[str], None],
    df: pd.DataFrame | None,
    table_columns: Sequence[str],
    hrefs: Mapping[str, str],
    density_vmax_per_mm2: float | None,
) -> None:
    """The cohort table (sortable, one row per slide, linked to its section or page) and
    its glossary."""
    w('<section id="cohort"><h2>Cohort</h2>')
    if df is not None and len(df):
        w('<p class="meta">Click a column header to sort; hover a header for its definition '
          "(also listed below the table). – = not defined (e.g. no tumour bulk); "
          "∞ = ratio with a zero denominator. Every measure of a slide is in its section.</p>")
        w('<div class="scroll"><table class="sortable" id="cohort-table"><thead><tr>')
        w('<th class="text" scope="col" data-col="slide_id"><button type="button">Slide</button></th>')
        w('<th class="text" scope="col" data-col="qc_flags" title="' + _e(term("qc_flags").definition)
          + '"><button type="button">QC</button></th>')
        for c in table_columns:
            t = term(c)
            unit = f'<span class="unit">{_e(t.unit)}</span>' if t.unit else ""
            w(f'<th scope="col" data-col="{_e(c)}" title="{_e(c)}: {_e(t.definition)}">'
              f'<button type="button">{_e(t.label)}</button>{unit}</th>')
        w("</tr></thead><tbody>")
        for rec in df.to_dict("records"):
            sid = str(rec["slide_id"])
            w(f'<tr><td class="text" data-v="{_e(sid)}"><a href="{_e(hrefs[sid])}">{_e(sid)}</a></td>')
            w(_qc_cell(rec.get("qc_flags")))
            for c in table_columns:
                v = _py(rec.get(c))
                if c == "immune_phenotype":
                    why = phenotype_reason({str(k): _py(x) for k, x in rec.items()})
                    w(f'<td class="text wrap" data-v="{_e(_sort_key(v))}">{_e(format_value(v))}'
                      f'<span class="why">{_e(why.split(": ", 1)[-1])}</span></td>')
                else:
                    w(_cell(v, column=c))
            w("</tr>")
        w("</tbody></table></div>")
        w(_glossary_html(table_columns, density_vmax_per_mm2))
    else:
        w('<p class="meta">No slide finished.</p>')
    w("</section>")


def _write_slide_section(
    w: Callable[[str], None], s: SlideSection, href: str, banners: Sequence[str]
) -> None:
    """One slide's section: phenotype, QC flags, source, notes, figures, every measure,
    parameters and provenance."""
    flat = flatten_row({**s.row, "slide_id": s.slide_id})
    params = dict(s.params) if s.params is not None else {
        k[len("param_"):]: _py(v) for k, v in flat.items() if column_kind(k) == "parameter"}
    prov = dict(s.provenance) if s.provenance is not None else {
        k: _py(v) for k, v in flat.items() if column_kind(k) == "provenance"}
    # cell_table_path is where counts came from: shown with the provenance
    biom = {k: _py(v) for k, v in flat.items()
            if column_kind(k) == "biomarker" and k not in ("qc_flags", "cell_table_path")}
    if s.provenance is None and "cell_table_path" in flat:
        prov["cell_table_path"] = _py(flat["cell_table_path"])
    w(f'<section class="slide" id="{href[1:]}"><h2>{_e(s.slide_id)}</h2>')
    for b in banners:
        w(f'<div class="banner">WARNING: {_e(b)}</div>')
    if "immune_phenotype" in flat:
        why = phenotype_reason({k: _py(v) for k, v in flat.items()})
        w(f'<p class="phenotype"><b>Immune phenotype: {_e(format_value(_py(flat["immune_phenotype"])))}'
          f'</b> · {_e(why.split(": ", 1)[-1])}</p>')
    w(_qc_block(flat.get("qc_flags")))
    source = " · ".join(
        f"{label}: {_e(format_value(_py(flat[k])))}" for k, label in (
            ("model_name", "Model"), ("model_domain", "trained on"),
            ("count_source", "lymphocyte counts from"), ("slide_mpp_um", "pixel size (µm/px)"),
            ("mpp_source", "from")) if k in flat)
    if source:
        w(f'<p class="meta">{source}</p>')
    for note in s.notes:
        w(f'<div class="note">{_e(note)}</div>')
    if s.figures:
        w('<div class="figs">')
        for caption, fig in s.figures.items():
            w(f"<figure>{_img_tag(fig, f'{caption} of {s.slide_id}')}"
              f"<figcaption>{_e(caption)}</figcaption></figure>")
        w("</div>")
    w(f"<h3>Measurements</h3>{_measures_table(biom)}")
    w("<details><summary>Parameters and provenance</summary>")
    w('<div class="cols">')
    w(f"<div><h3>Parameters</h3>{_kv_table(params)}</div>")
    w(f"<div><h3>Provenance</h3>{_kv_table(prov)}</div>")
    w("</div></details></section>")


def _py(v: Any) -> Any:
    """pandas/numpy scalars to Python (NaN stays float NaN, pandas NA becomes None)."""
    if v is None:
        return None
    try:
        import pandas as pd

        if v is pd.NA or v is pd.NaT:
            return None
    except ImportError:  # pragma: no cover
        pass
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return v
    return v


def write_html_report(
    path: str | os.PathLike[str],
    slides: Sequence[SlideSection],
    failures: Iterable[Any] | None = (),
    **kw: Any,
) -> Path:
    """Write :func:`render_html_report` to ``path`` (atomically) and return the path."""
    return atomic_write_text(path, render_html_report(slides, failures, **kw))
