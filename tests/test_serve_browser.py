"""The serve page in a real browser: headless Chromium picks the model, uploads MVTec AD bottle's
broken_large/000.png, and sees the verdict "defective" with the overlay loaded.

Needs the real bottle data, the Debian packages ``chromium`` and ``chromium-driver``, the
``selenium`` package and the serve extra; skipped with the reason when any is missing.
"""

from __future__ import annotations

from pathlib import Path

import chromium
import pytest

chromium.require()

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'defectscope[serve]')")

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def bottle_model(bottle):
    """A quick bottle model: 16 good training images at 128 px."""
    import defectscope

    train = sorted((bottle / "train" / "good").glob("*.png"))[:16]
    return defectscope.fit(train, image_size=128, coreset_ratio=0.1)


def test_page_scores_a_dropped_photo(bottle, bottle_model, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from serving import running

    from defectscope.serve.app import create_app

    photo = bottle / "test" / "broken_large" / "000.png"
    with running(create_app({"bottle": bottle_model})) as url:
        driver = chromium.start(tmp_path / "chromium-profile")
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.execute_script("return document.getElementById('model').options.length") > 0)
            Select(driver.find_element("id", "model")).select_by_value("bottle")
            driver.find_element("id", "file").send_keys(str(Path(photo).resolve()))
            wait.until(lambda d: d.find_element("id", "verdict").text or d.find_element("id", "error").text)
            assert driver.find_element("id", "error").text == ""
            assert driver.find_element("id", "verdict").text == "defective"
            wait.until(
                lambda d: d.execute_script(
                    "const i = document.getElementById('overlay');return i.complete && i.naturalWidth > 0"
                )
            )
            width = driver.execute_script("return document.getElementById('overlay').naturalWidth")
            assert width >= 900  # the photo's own width, legend below
            assert float(driver.find_element("id", "score").text) >= float(driver.find_element("id", "threshold").text)
            assert driver.find_element("css selector", ".legend").is_displayed()
            severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert severe == []
            assert driver.save_screenshot(str(tmp_path / "serve-page.png"))
        finally:
            driver.quit()
