"""report.html as a person sees it: opened in headless chromium at 1280 x 800.

Each test leaves a screenshot (``report-1280.png``) beside the page for a human
to look at. Playwright cannot download its own browser here, so it drives the
system's (Debian's ``chromium``); without one, or without playwright, the tests
skip and say which is missing.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
WIDTH = 1280

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium: /usr/bin/chromium absent and none on PATH"),
]


def look_at(page_path: Path, shot: Path) -> dict:
    """Open PAGE_PATH at 1280 x 800, save a full-page screenshot to SHOT, return what the page measures."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # tests run as root
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 800})
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(shot), full_page=True)
            return page.evaluate("""() => ({
                scrollWidth: document.documentElement.scrollWidth,
                tableScrollWidth: document.querySelector('table').scrollWidth,
                tableBoxWidth: document.querySelector('.table').clientWidth,
                headers: [...document.querySelectorAll('th')].map(th => th.innerText.replace(/\\s+/g, ' ')),
                images: [...document.querySelectorAll('img')].map(img => ({
                    src: img.getAttribute('src'), complete: img.complete, naturalWidth: img.naturalWidth,
                    right: img.getBoundingClientRect().right})),
            })""")
        finally:
            browser.close()


def assert_readable(seen: dict, columns: list[str], shot: Path) -> None:
    from shoal.bench.report import FIELDS

    assert seen["scrollWidth"] <= WIDTH, f"the page overflows a {WIDTH} px window: see {shot}"
    assert seen["tableScrollWidth"] <= seen["tableBoxWidth"], f"the table needs scrolling: see {shot}"
    assert seen["headers"] == [FIELDS[c].label for c in columns]
    assert not [h for h in seen["headers"] if re.search(r"[a-z0-9]_[a-z0-9]", h)], "a raw field name in a header"
    assert seen["images"], "the page shows no plot"
    for image in seen["images"]:
        assert image["complete"] and image["naturalWidth"] > 0, f"{image['src']} did not load"
        assert image["right"] <= WIDTH, f"{image['src']} is wider than the window"
    assert shot.stat().st_size > 10_000


def test_bench_fl_writes_a_report_that_fits_the_window_with_its_headers_in_words(tmp_path):
    from shoal.bench import fl

    out = tmp_path / "bench-fl"
    result = run_cli("bench", "fl", "--quick", "--rows", "centralised,fedavg-iid,fedsgd,fedavg-topk",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr

    seen = look_at(out / "report.html", out / "report-1280.png")

    shutil.copy(out / "report-1280.png", tmp_path / "report-1280.png")
    assert_readable(seen, fl.COLUMNS, out / "report-1280.png")
    assert {i["src"] for i in seen["images"]} == {"accuracy-iid.png"}
    rows = json.loads((out / "bench.json").read_text())  # machine-readable output keeps the raw names
    assert {"rounds_to_target", "uplink_bytes", "final_accuracy"} <= set(rows[0])


def test_the_widest_table_bench_compress_fits_too(tmp_path):
    from shoal.bench import compress
    from shoal.bench.report import write_html

    def row(label, kb, ms1, ms32, acc, nonzero):
        return {"model": "cnn2d", "label": label, "artefact_bytes": kb * 1000, "nonzero_parameters": nonzero,
                "latency_ms_batch1": ms1, "latency_ms_batch32": ms32, "speedup_batch1": 0.0412 / ms1,
                "speedup_batch32": 0.4 / ms32, "accuracy": acc, "finetune_steps": 0 if "prune" not in label and
                "channels" not in label else 300, "failed": False}

    rows = [row("fp32", 42.381, 0.0412, 0.4, 0.9533, 10234), row("int8-dynamic", 12.3, 0.061, 0.45, 0.9516, 10234),
            row("int8-static", 12.5, 0.059, 0.43, 0.9527, 10234), row("prune-80", 15.2, 0.0415, 0.39, 0.9411, 2047),
            row("prune-80+int8-static", 5.1, 0.057, 0.41, 0.9399, 2047),
            row("channels-50", 11.0, 0.021, 0.13, 0.9012, 2600),
            row("channels-50+int8-static", 3.2, 0.03, 0.12, 0.8977, 2600),
            {"model": "cnn2d", "label": "prune-95", "failed": True, "error": "RuntimeError: no weights left"}]
    compress.compare(rows)
    images = compress.plot_pareto(rows, tmp_path)
    page = write_html(rows, tmp_path, images, "shoal bench compress", "shoal bench compress --quick", compress.COLUMNS)

    seen = look_at(page, tmp_path / "report-1280.png")

    assert_readable(seen, compress.COLUMNS, tmp_path / "report-1280.png")
    assert "artefact size (KB)" in seen["headers"] and "latency, batch 1 (ms)" in seen["headers"]
