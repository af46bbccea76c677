"""HTML report: escaping, self-containment, and a real look in headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tmequant.batch import Failure
from tmequant.report.figures import SlideGeometry, plot_lymphocyte_density, plot_thumbnail
from tmequant.report.html import (
    IMAGE_MIME,
    SlideSection,
    format_value,
    render_html_report,
    write_html_report,
)

EVIL = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs it)")


def _slide(sid: str, seed: int, til: float, ratio: float) -> SlideSection:
    """A fake slide: a synthetic thumbnail, two real pictures and a biomarker row."""
    rng = np.random.default_rng(seed)
    h, w = 48 + 8 * seed, 64
    thumb = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - h / 2) / (h / 2.4)) ** 2 + ((xx - w / 2) / (w / 2.4)) ** 2 < 1
    thumb[mask] = (205, 130, 180)
    geom = SlideGeometry(thumb_downsample=32.0, slide_mpp_um=0.5, tile_level0_px=224.0)  # 7 px tiles
    rc = np.argwhere(np.ones((h // 7, w // 7), bool))
    figs = {
        "Thumbnail and tissue mask": plot_thumbnail(thumb, mask, geom, title=sid),
        "Lymphocyte density per tile": plot_lymphocyte_density(
            thumb, rc, rng.gamma(2, 300, len(rc)), geom, title=sid),
    }
    row = {"til_density_intratumoral_per_mm2": til, "exclusion_ratio_stroma_to_tumor": ratio,
           "immune_phenotype": ["inflamed", "excluded", "desert"][seed % 3], "tls_count": seed,
           "source_path": f"/data/{sid}.svs", "mpp_source": "vendor", "params_hash": "0123abcd",
           "param_margin_um": 500.0, "param_tls_prob": 0.5}
    return SlideSection(sid, row, figs, notes=(f"note about {sid}",))


@pytest.fixture(scope="module")
def cohort() -> tuple[list[SlideSection], list]:
    slides = [
        _slide("s2", 0, 35.5, float("inf")),
        _slide(EVIL, 1, 384.0, float("nan")),
        _slide("s10", 2, 510.0, 1.5),
    ]
    failures = [Failure("broken<img src=x onerror=alert(2)>", "tile", "SlideError: cannot open " + EVIL)]
    return slides, failures


# --- static checks -------------------------------------------------------------------
class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def test_malicious_ids_are_escaped(cohort):
    html = render_html_report(*cohort)
    assert EVIL not in html and "onerror=alert(2)>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    p = _Collect()
    p.feed(html)
    assert [t for t, _ in p.tags].count("script") == 1  # only the report's own script
    assert not [t for t, a in p.tags if t == "img" and "onerror" in a]


def test_report_is_self_contained(cohort):
    slides, failures = cohort
    html = render_html_report(slides, failures)
    p = _Collect()
    p.feed(html)
    imgs = [a for t, a in p.tags if t == "img"]
    assert len(imgs) == sum(len(s.figures) for s in slides)
    assert all(a["src"].startswith(f"data:{IMAGE_MIME};base64,") for a in imgs)
    for a in imgs:  # every embedded picture decodes to the size the tag states or smaller
        png = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert int(a["width"]) <= png.width and int(a["height"]) <= png.height
    assert not [t for t, _ in p.tags if t in ("link", "iframe", "object", "embed")]
    hrefs = [a["href"] for t, a in p.tags if t == "a"]
    assert hrefs and all(h.startswith("#") for h in hrefs)
    assert not [a for t, a in p.tags if t == "script" and "src" in a]
    # the CSP allows exactly the inline script that is there
    (script,) = p.scripts
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = next(a["content"] for t, a in p.tags if t == "meta" and a.get("http-equiv"))
    assert f"'sha256-{digest}'" in csp and "default-src 'none'" in csp


def test_non_png_figure_is_rejected(tmp_path):
    bad = SlideSection("s", {"x": 1.0}, {"fig": b"GIF89a not a png"})
    with pytest.raises(ValueError, match="not a PNG"):
        render_html_report([bad])


def test_no_slides_only_failures_still_renders(tmp_path):
    out = write_html_report(tmp_path / "r" / "report.html", [],
                            [{"slide_id": "x", "stage": "predict", "reason": "ModelError: bad"}])
    text = out.read_text()
    assert "No slide finished" in text and "ModelError: bad" in text


def test_format_value():
    assert format_value(float("inf")) == "∞" and format_value(float("nan")) == "–"
    assert format_value(None) == "–" and format_value(True) == "yes"
    assert format_value(12345.6) == "12,346" and format_value(0.012345) == "0.0123"


# --- Chromium ----------------------------------------------------------------------------
def _chromium(args: list[str], tmp: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
        capture_output=True, timeout=timeout, text=True, stdin=subprocess.DEVNULL, check=False,
    )


def _non_blank(png_path: Path) -> None:
    img = np.asarray(Image.open(png_path).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 10, "screenshot is blank"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


@needs_chromium
def test_report_in_chromium_dump_dom_and_screenshot(cohort, tmp_path):
    slides, failures = cohort
    report = write_html_report(tmp_path / "report.html", slides, failures)
    res = _chromium(["--dump-dom", report.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="1"' in body  # the page's load handler ran
    assert 'data-images-ok="true"' in body
    assert f'data-images="{sum(len(s.figures) for s in slides)}"' in body
    assert 'data-errors="0"' in body
    table = dom[dom.index('id="cohort-table"'):]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + len(slides)  # header + one row per slide
    assert dom.count("<script") == 1 and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom

    shot = tmp_path / "screenshot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,1600", report.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    _non_blank(shot)
    if os.environ.get("TMEQUANT_KEEP_SCREENSHOT"):  # for looking at it by hand
        shutil.copy(shot, os.environ["TMEQUANT_KEEP_SCREENSHOT"])


class _Cdp:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, args: list[str], timeout: float = 60):
        import fcntl

        r3, self.w = os.pipe()
        self.r, w4 = os.pipe()
        # move the child's ends above 9 so the shell's 3<& and 4>& cannot clobber them
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (r3, w4)]
        os.close(r3)
        os.close(w4)
        r3, w4 = hi
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{r3} 4>&{w4} {r3}<&- {w4}>&-', CHROMIUM, *args,
               "--remote-debugging-pipe"]
        self.proc = subprocess.Popen(cmd, pass_fds=(r3, w4), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r3)
        os.close(w4)
        self.buf, self.n, self.events, self.timeout = b"", 0, [], timeout

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer")
            if select.select([self.r], [], [], left)[0]:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            m = self._read(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def errors(self) -> list[dict]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown" or (m == "Runtime.consoleAPICalled" and p.get("type") == "error") \
                    or (m == "Log.entryAdded" and p["entry"].get("level") == "error"):
                out.append(e)
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, TimeoutError, EOFError, RuntimeError):
            pass  # it is going away anyway; kill below if it does not
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


@needs_chromium
def test_report_in_chromium_sorts_and_logs_no_errors(cohort, tmp_path):
    slides, failures = cohort
    report = write_html_report(tmp_path / "report.html", slides, failures)
    cdp = _Cdp([*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"])
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            cdp.send(domain, session=sid)
        cdp.send("Page.navigate", {"url": report.as_uri()}, session=sid)
        cdp.wait_event("Page.loadEventFired")

        def js(expr: str):
            res = cdp.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sid)
            return res["result"].get("value")

        heads = js("[...document.querySelectorAll('#cohort-table thead th')].map(t => t.dataset.col)")
        til = heads.index("til_density_intratumoral_per_mm2")
        ratio = heads.index("exclusion_ratio_stroma_to_tumor")
        col = "(i => [...document.querySelectorAll('#cohort-table tbody tr')].map(r => r.cells[i].textContent))"
        click = "(i => document.querySelectorAll('#cohort-table thead button')[i].click())"
        js(f"{click}({til})")
        asc = js(f"{col}({til})")
        js(f"{click}({til})")
        desc = js(f"{col}({til})")
        assert [float(v.replace(",", "")) for v in asc] == [35.5, 384.0, 510.0]
        assert desc == asc[::-1]
        js(f"{click}({ratio})")
        assert js(f"{col}({ratio})") == ["1.50", "∞", "–"]  # numeric, inf after finite, NaN last
        js(f"{click}({ratio})")
        assert js(f"{col}({ratio})") == ["∞", "1.50", "–"]  # NaN stays last when descending
        assert js("document.body.dataset.imagesOk") == "true"
        assert js("[...document.images].every(i => i.complete && i.naturalWidth > 0)") is True
        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, session=sid)["data"]
        (tmp_path / "cdp.png").write_bytes(base64.b64decode(shot))
        _non_blank(tmp_path / "cdp.png")
        assert cdp.errors() == []
    finally:
        cdp.close()
