"""The HTML report in a real browser: headless Chromium loads it from file://, every image loads,
the console stays clean, and a screenshot is saved.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the ``selenium`` package;
skipped with the reason when either is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import chromium
import pytest

chromium.require()


@pytest.fixture()
def browser(tmp_path):
    driver = chromium.start(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def check_page(driver, page: Path, screenshot: Path, max_height: int = 8000) -> dict:
    """Load ``page``; return what was found: images, broken images, SEVERE console entries.

    The screenshot shows the page from the top, up to ``max_height`` CSS pixels.
    """
    driver.get(page.resolve().as_uri())
    driver.execute_script("return document.readyState")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
        )
    )
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])"
    )
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(800, height), max_height))
    assert driver.save_screenshot(str(screenshot))
    return {"images": images, "broken": [src for src, w in images if not w], "severe": severe, "title": driver.title}


def test_report_renders_in_chromium(browser, tmp_path):
    from test_report import META, make_result

    from defectscope.report.html import write_report

    report = tmp_path / "report"
    page = write_report(make_result(report, n_good=10, n_bad=10), report, meta=META)
    shot = tmp_path / "report.png"
    found = check_page(browser, page, shot)
    assert found["title"].startswith("defectscope report")
    assert len(found["images"]) >= 6 + 20  # five figures, the catch / false-reject trade-off, the overlays
    assert "figures/tradeoff.png" in [src for src, _ in found["images"]]
    assert found["broken"] == []
    assert found["severe"] == []
    assert shot.stat().st_size > 10_000


def test_broken_image_is_detected(browser, tmp_path):
    """The checks can fail: a missing image and a script error are both seen."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><script>undefined_function()</script></body></html>'
    )
    found = check_page(browser, page, tmp_path / "bad.png")
    assert found["broken"] == ["missing.png"]
    assert found["severe"]


def test_benchmark_index_renders(browser, tmp_path):
    from defectscope.report.html import write_benchmark_index

    page = write_benchmark_index(
        [{"dataset": "bottle", "method": "patchcore", "image_auroc": 1.0, "report": "bottle"}], tmp_path
    )
    found = check_page(browser, page, tmp_path / "bench.png")
    assert found["severe"] == [] and found["broken"] == []
    assert browser.find_element("link text", "bottle").get_attribute("href").endswith("/bottle/index.html")
    from defectscope.report.html import render_benchmark_summary

    top = tmp_path / "top.html"
    top.write_text(
        render_benchmark_summary(
            [
                {
                    "name": "patchcore",
                    "href": "index.html",
                    "image_auroc": 1.0,
                    "pixel_auroc": None,
                    "n_ok": 1,
                    "n_categories": 1,
                }
            ]
        )
    )
    found = check_page(browser, top, tmp_path / "top.png")
    assert found["severe"] == [] and found["broken"] == []
    assert browser.find_element("link text", "patchcore").get_attribute("href").endswith("/index.html")


if __name__ == "__main__":  # python tests/test_report_browser.py REPORT_DIR OUT.png [MAX_HEIGHT]
    import sys
    import tempfile

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    drv = chromium.start(Path(profile))
    try:
        height = int(sys.argv[3]) if len(sys.argv) > 3 else 8000
        result = check_page(drv, Path(sys.argv[1]) / "index.html", Path(sys.argv[2]), height)
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{len(result['images'])} images, broken: {result['broken']}, severe console entries: {result['severe']}")
    sys.exit(1 if result["broken"] or result["severe"] else 0)
