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
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmequant.provenance import canonical_json, package_version
from tmequant.report.tables import cohort_frame, column_kind, flatten_row

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


def format_value(v: Any) -> str:
    """Human-readable cell text: 3 significant digits for small numbers, thousands separators."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


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


def _img_tag(fig: bytes | str | os.PathLike[str], alt: str) -> str:
    """An <img> with the PNG inline and its display size fixed from the PNG header
    (explicit sizes keep the layout stable and the labels legible)."""
    data = _png_bytes(fig)
    w_px, h_px = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    scale = min(1.0, MAX_FIGURE_WIDTH_PX / max(w_px, 1))
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
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


def _cell(v: Any, text: bool = False) -> str:
    cls = ' class="text"' if text or isinstance(v, str) else ""
    return f'<td{cls} data-v="{_e(_sort_key(v))}">{_e(format_value(v))}</td>'


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
    """
    show_failures = failures is not None
    failures = [_failure_fields(f) for f in failures or ()]
    rows = [{**s.row, "slide_id": s.slide_id} for s in slides]
    df = cohort_frame(rows) if rows else None
    if table_columns is None:
        bio = [str(c) for c in (df.columns if df is not None else []) if column_kind(str(c)) == "biomarker"]
        table_columns = [c for c in KEY_COLUMNS if c in bio] + [c for c in bio if c not in KEY_COLUMNS]
    ordered = sorted(slides, key=lambda s: str(s.slide_id))
    hrefs = {s.slide_id: f"#slide-{i}" for i, s in enumerate(ordered)}
    if slide_links is not None:
        hrefs.update({str(k): v for k, v in slide_links.items()})

    out: list[str] = []
    w = out.append
    w("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
    w(f'<meta http-equiv="Content-Security-Policy" content="{_e(_csp(_JS))}">')
    w('<meta name="viewport" content="width=device-width, initial-scale=1">')
    w(f"<title>{_e(title)}</title><style>{_CSS}</style></head>")
    w('<body data-ready="0">')
    meta = f"{len(slides)} slide(s) analysed"
    if show_failures:
        meta += f", {len(failures)} failed"
    meta += f" · tmequant {_e(package_version())}"
    if generated_at:
        meta += f" · {_e(generated_at)}"
    back = f' · <a href="{_e(back_link)}">back to the cohort</a>' if back_link else ""
    w(f'<header><h1>{_e(title)}</h1><div class="meta">{meta}{back}</div></header>')

    # cohort table
    w('<section id="cohort"><h2>Cohort</h2>')
    if df is not None and len(df):
        w('<p class="meta">Click a column header to sort. – = not defined (e.g. no tumour bulk); '
          "∞ = ratio with a zero denominator.</p>")
        w('<div class="scroll"><table class="sortable" id="cohort-table"><thead><tr>')
        w('<th class="text" scope="col"><button type="button">slide</button></th>')
        for c in table_columns:
            w(f'<th scope="col"><button type="button">{_e(c)}</button></th>')
        w("</tr></thead><tbody>")
        for rec in df.to_dict("records"):
            sid = str(rec["slide_id"])
            w(f'<tr><td class="text" data-v="{_e(sid)}"><a href="{_e(hrefs[sid])}">{_e(sid)}</a></td>')
            w("".join(_cell(_py(rec.get(c))) for c in table_columns))
            w("</tr>")
        w("</tbody></table></div>")
    else:
        w('<p class="meta">No slide finished.</p>')
    w("</section>")

    if show_failures:
        w(_failures_html(failures))

    # per-slide sections
    for s in ordered:
        if not hrefs[s.slide_id].startswith("#"):
            continue  # it has its own page
        flat = flatten_row({**s.row, "slide_id": s.slide_id})
        params = dict(s.params) if s.params is not None else {
            k[len("param_"):]: _py(v) for k, v in flat.items() if column_kind(k) == "parameter"}
        prov = dict(s.provenance) if s.provenance is not None else {
            k: _py(v) for k, v in flat.items() if column_kind(k) == "provenance"}
        biom = {k: _py(v) for k, v in flat.items() if column_kind(k) == "biomarker"}
        w(f'<section class="slide" id="{hrefs[s.slide_id][1:]}"><h2>{_e(s.slide_id)}</h2>')
        for note in s.notes:
            w(f'<div class="note">{_e(note)}</div>')
        if s.figures:
            w('<div class="figs">')
            for caption, fig in s.figures.items():
                w(f"<figure>{_img_tag(fig, f'{caption} of {s.slide_id}')}"
                  f"<figcaption>{_e(caption)}</figcaption></figure>")
            w("</div>")
        w('<div class="cols">')
        w(f"<div><h3>Biomarkers</h3>{_kv_table({k: format_value(v) for k, v in biom.items()})}</div>")
        w(f"<div><h3>Parameters</h3>{_kv_table(params)}</div>")
        w(f"<div><h3>Provenance</h3>{_kv_table(prov)}</div>")
        w("</div></section>")

    w(f"<script>{_JS}</script></body></html>\n")
    return "".join(out)


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
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(render_html_report(slides, failures, **kw), encoding="utf-8")
    os.replace(tmp, p)
    return p
