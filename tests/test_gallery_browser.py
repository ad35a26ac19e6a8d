"""The web gallery in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real `piaa serve` process on a ShapesWorld library built as `piaa demo`
builds one: the landing page (latest images, the library by tag), search with label
completion, results as the API ranks them, an image page, an evidence heatmap and its zoom, a
phone-width layout, an API error shown, confirming and rejecting tags then a fit, teaching a
concept from selected results, and vocabulary editing with fit/index jobs followed to the end
(each job loads the model in its worker: ~5-12 s a test, so all run in `make test`).
Screenshots go to docs/ with PIAA_WRITE_SCREENSHOTS=1.

Skipped when chromium or its driver is missing, unless PIAA_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.piaa_processes import start_server, stop_server

pytestmark = pytest.mark.browser

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"
WAIT = 30.0  # seconds any one thing may take to appear


def _browser() -> tuple[str, str] | None:
    binary = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver = shutil.which(DRIVER)
    return (binary, driver) if binary and driver else None


def _need_browser() -> tuple[str, str]:
    found = _browser()
    missing = "headless Chromium is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        found, missing = None, "selenium is not installed (pip install selenium)"
    try:
        import piaa_index_plugins.http_api.app  # noqa: F401  (the FastAPI app serves the gallery)
    except ImportError:
        found, missing = None, "the FastAPI app (plugins/http_api/app.py) is not here"
    if found is None:
        if os.environ.get("PIAA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PIAA_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(home: Path) -> Iterator[tuple[str, str]]:
    """`piaa serve` on `home` as a user runs it; yields (the printed gallery URL, its key)."""
    db = f"sqlite:///{home / 'piaa.sqlite3'}"
    cmd = [sys.executable, "-m", "piaa_index", "--home", str(home), "--db", db]
    served = start_server([*cmd, "serve", "--port", str(_free_port())], dict(os.environ))
    try:
        yield f"{served.base}/#key={served.key}", served.key
    finally:
        stop_server(served.proc)


@pytest.fixture(scope="module")
def server(shapes_home: Path) -> Iterator[tuple[str, str]]:
    """The shared demo-like library, served (read only: thumbnails are its only writes)."""
    _need_browser()
    with serve(shapes_home) as url_key:
        yield url_key


@pytest.fixture(scope="module")
def driver(server):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, chromedriver = _need_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    browser.set_page_load_timeout(WAIT)
    try:
        yield browser
    finally:
        browser.quit()


def _api(base: str, key: str, path: str) -> dict:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def _wait(driver, what, timeout: float = WAIT):  # type: ignore[no-untyped-def]
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A view re-rendered while polling (e.g. the image page after a fit) is polled again.
    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=[StaleElementReferenceException],
    ).until(lambda d: what(d))


def _screenshot(driver, name: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The page as pixels; written to docs/NAME when PIAA_WRITE_SCREENSHOTS=1 (256 colours:
    a fifth of the bytes, and the docs do not need more)."""
    page = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    if os.environ.get("PIAA_WRITE_SCREENSHOTS") == "1":
        page.quantize(256).save(DOCS / name, optimize=True)
    return np.asarray(page, dtype=np.float64)


def _images_loaded(driver, selector: str) -> bool:  # type: ignore[no-untyped-def]
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll(arguments[0])];"
            "return imgs.length > 0 && imgs.every(i => i.src.startsWith('blob:')"
            " && i.complete && i.naturalWidth > 0);",
            selector,
        )
    )


def test_search_image_page_and_heatmap(server, driver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, key = server
    base = url.split("#", 1)[0].rstrip("/")
    # The label most images carry, so the search has results to compare.
    labels = _api(base, key, "/api/labels?prefix=&limit=100")["labels"]
    label = max(labels, key=lambda item: item["count"])["label"]
    expected = _api(
        base,
        key,
        "/api/queries/search?" + urllib.parse.urlencode({"expression": f'"{label}"', "limit": 48}),
    )["results"]
    assert expected, "the demo library should tag its most frequent label somewhere"

    driver.get(url)
    # The key moved from the fragment into sessionStorage, out of the address bar.
    _wait(driver, lambda d: "#key=" not in d.current_url)
    _wait(driver, lambda d: "images" in d.find_element(By.ID, "status").text)

    # A favicon: an inline SVG that draws.
    icon = driver.find_element(By.CSS_SELECTOR, 'link[rel="icon"]').get_attribute("href")
    assert icon.startswith("data:image/svg+xml,")
    drawn = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; const i = new Image();"
        "i.onload = () => done(i.naturalWidth); i.onerror = () => done(0); i.src = arguments[0];",
        icon,
    )
    assert drawn > 0

    # Label completion: Escape closes the list.
    box = driver.find_element(By.ID, "q")
    suggestions = driver.find_element(By.ID, "suggestions")
    box.send_keys(label[:3])
    _wait(driver, lambda d: suggestions.is_displayed())
    box.send_keys(Keys.ESCAPE)
    _wait(driver, lambda d: not suggestions.is_displayed())
    assert box.get_attribute("aria-expanded") == "false"
    box.clear()
    # Type the start of the label, accept the suggestion with the keyboard.
    box.send_keys(label[:3])
    _wait(
        driver,
        lambda d: (
            label
            in [
                li.get_attribute("data-label")
                for li in d.find_elements(By.CSS_SELECTOR, "#suggestions li")
            ]
        ),
    )
    options = [
        li.get_attribute("data-label")
        for li in driver.find_elements(By.CSS_SELECTOR, "#suggestions li")
    ]
    for _ in range(options.index(label) + 1):
        box.send_keys(Keys.ARROW_DOWN)
    box.send_keys(Keys.ENTER)
    accepted = box.get_attribute("value").strip()
    assert accepted in (label, f'"{label}"')
    box.send_keys(Keys.ENTER)  # submit

    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == len(expected))
    shown = [
        int(li.get_attribute("data-id"))
        for li in driver.find_elements(By.CSS_SELECTOR, "#results li")
    ]
    assert shown == [row["id"] for row in expected]
    _wait(driver, lambda d: _images_loaded(d, "#results img"))
    alts = [
        img.get_attribute("alt") for img in driver.find_elements(By.CSS_SELECTOR, "#results img")
    ]
    assert alts == [Path(row["path"]).name for row in expected]
    # The completion list is closed over the results, and stays closed (no late answer).
    time.sleep(0.5)
    assert not suggestions.is_displayed()
    pixels = _screenshot(driver, "gallery-search.png")
    assert pixels.std() > 20  # thumbnails drawn, not a blank page

    # The image page: every label's tags, and the evidence heatmap of the searched label.
    driver.find_element(By.CSS_SELECTOR, "#results li a").click()
    _wait(
        driver, lambda d: d.find_element(By.ID, "evidence-img").get_attribute("data-label") == label
    )
    _wait(driver, lambda d: _images_loaded(d, "#evidence-img"))
    rows = driver.find_elements(By.CSS_SELECTOR, "#tags-table tbody tr")
    assert len(rows) == len(labels)
    # What is in the photo first, then the other labels folded away, most likely first; no
    # Patch/Threshold columns, no generic "why" repeated down the rows.
    tagged = [r for r in rows if "present" in (r.get_attribute("class") or "").split()]
    assert tagged and rows[: len(tagged)] == tagged
    assert all(r.is_displayed() for r in tagged)
    untagged = driver.find_elements(By.CSS_SELECTOR, "#other-tags tbody tr")
    assert untagged == rows[len(tagged) :] and untagged
    assert not any(r.is_displayed() for r in untagged)  # folded
    summary = driver.find_element(By.CSS_SELECTOR, "#other-tags summary")
    assert summary.text == f"{len(untagged)} other labels, not in this photo"
    scores = {
        t["label"]: t["score"] for t in _api(base, key, f"/api/images/{expected[0]['id']}")["tags"]
    }
    others = [scores[r.get_attribute("data-label")] for r in untagged]
    assert others == sorted(others, reverse=True)
    heads = driver.find_element(By.ID, "tags-table").text
    assert "Patch" not in heads and "Threshold" not in heads
    assert "one half" not in heads
    caption = driver.find_element(By.ID, "evidence-caption").text
    assert label in caption and "tagged" in caption
    image_id = expected[0]["id"]
    ev = _api(
        base,
        key,
        f"/api/images/{image_id}/evidence?"
        + urllib.parse.urlencode({"label": label, "format": "json"}),
    )
    assert f"{ev['max']:.3f}" in caption
    # The photo's facts (GET /api/images/{id}/exif): its size; ShapesWorld has no camera.
    info = _api(base, key, f"/api/images/{image_id}")
    size = f"{info['width']} × {info['height']} px"
    _wait(driver, lambda d: size in d.find_element(By.ID, "exif").text)
    facts = driver.find_element(By.ID, "exif").text
    assert "Camera" in facts and "Taken" in facts and "Exposure" in facts
    assert "none in this file" in facts
    pixels = _screenshot(driver, "gallery-evidence.png")
    assert pixels.std() > 20

    # Zoom: a click shows the picture over the window, fitted; another, its actual pixels;
    # Esc closes it.
    driver.find_element(By.ID, "evidence-img").click()
    zoom = _wait(
        driver,
        lambda d: d.find_element(By.ID, "zoom").is_displayed() and d.find_element(By.ID, "zoom"),
    )
    # The zoom swaps the page's 512-pixel picture for the larger one it fetched (here the
    # evidence map at up to 1024 pixels; never upscaled past the photo).
    _wait(
        driver,
        lambda d: (
            d.find_element(By.ID, "zoom-img").get_attribute("src")
            != d.find_element(By.ID, "evidence-img").get_attribute("src")
        ),
    )
    _wait(driver, lambda d: _images_loaded(d, "#zoom-img"))
    natural = driver.execute_script("return document.getElementById('zoom-img').naturalWidth")
    longer = max(info["width"], info["height"])
    assert natural == round(info["width"] * min(1.0, 1024 / longer))
    fitted = driver.find_element(By.ID, "zoom-img").size
    assert fitted["height"] > 900 or fitted["width"] > 1200  # the window, not the thumbnail
    _screenshot(driver, "gallery-zoom.png")
    driver.find_element(By.ID, "zoom-img").click()
    _wait(driver, lambda d: "actual" in (zoom.get_attribute("class") or ""))
    natural = driver.execute_script("return document.getElementById('zoom-img').naturalWidth")
    assert driver.find_element(By.ID, "zoom-img").size["width"] == natural
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _wait(driver, lambda d: not zoom.is_displayed())

    # Another label, from the other labels unfolded, swaps the heatmap; its details (the
    # numbers, the why) are one click away.
    summary.click()
    _wait(driver, lambda d: rows[-1].is_displayed())
    more = rows[-1].find_element(By.CSS_SELECTOR, "details.row-more")
    more.find_element(By.TAG_NAME, "summary").click()
    numbers = more.find_element(By.CSS_SELECTOR, ".numbers").text
    assert "threshold" in numbers and "patch" in numbers
    other = rows[-1].find_element(By.CSS_SELECTOR, "button")
    other_label = other.text
    other.click()
    _wait(
        driver,
        lambda d: d.find_element(By.ID, "evidence-img").get_attribute("data-label") == other_label,
    )

    # Phone width: nothing wider than the screen.
    driver.set_window_size(390, 844)
    time.sleep(0.3)
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth"
    )
    assert overflow <= 1
    driver.set_window_size(1280, 1000)


def test_landing_page_shows_the_library_by_tag(server, driver) -> None:
    """No query: the latest images, then every tag with its count (most-tagged first), rows of
    the best images of the most-tagged labels as search ranks them, and a chip opens a search."""
    from selenium.webdriver.common.by import By

    url, key = server
    base = url.split("#", 1)[0].rstrip("/")
    labels = _api(base, key, "/api/labels?limit=1000")["labels"]
    seen = sorted((x for x in labels if x["count"] > 0), key=lambda x: -x["count"])
    assert seen, "the demo library should tag something"
    newest = _api(base, key, "/api/images?order=newest&limit=48")["images"]

    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.ID, "by-tag").is_displayed())
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == len(newest))
    shown = [
        int(li.get_attribute("data-id"))
        for li in driver.find_elements(By.CSS_SELECTOR, "#results li")
    ]
    assert shown == [im["id"] for im in newest]
    chips = driver.find_elements(By.CSS_SELECTOR, "#tag-chips a")
    assert [c.text for c in chips] == [f"{x['label']} {x['count']}" for x in seen]
    unseen = [x["label"] for x in labels if x["count"] == 0]
    note = driver.find_element(By.ID, "tag-unseen").text
    assert all(name in note for name in unseen) and (bool(note) == bool(unseen))

    # One row per most-tagged label (up to four), each the label's best eight as search ranks.
    rows = min(4, len(seen))
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tag-rows .tag-row")) == rows)
    top = seen[0]["label"]
    best = _api(
        base,
        key,
        "/api/queries/search?" + urllib.parse.urlencode({"expression": f'"{top}"', "limit": 8}),
    )["results"]
    first = driver.find_elements(By.CSS_SELECTOR, "#tag-rows .tag-row")[0]
    assert first.find_element(By.TAG_NAME, "h3").text.startswith(f"{top} · {seen[0]['count']} ")
    _wait(driver, lambda d: len(first.find_elements(By.CSS_SELECTOR, "li")) == len(best))
    assert [
        int(li.get_attribute("data-id")) for li in first.find_elements(By.CSS_SELECTOR, "li")
    ] == [r["id"] for r in best]
    # (Lazy images load once on screen: scroll the first row into view.)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", first)
    _wait(driver, lambda d: _images_loaded(d, "#tag-rows .tag-row:first-child img"))
    assert _screenshot(driver, "gallery-landing.png").std() > 20

    # A chip is a search for its label.
    driver.find_elements(By.CSS_SELECTOR, "#tag-chips a")[0].click()
    _wait(driver, lambda d: "for" in d.find_element(By.ID, "result-count").text)
    assert not driver.find_element(By.ID, "by-tag").is_displayed()
    expected = _api(
        base,
        key,
        "/api/queries/search?" + urllib.parse.urlencode({"expression": f'"{top}"', "limit": 48}),
    )["results"]
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == len(expected))


def test_api_errors_are_shown(server, driver) -> None:
    from selenium.webdriver.common.by import By

    url, _ = server
    base = url.split("#", 1)[0].rstrip("/")
    driver.get(base + "/#/?q=" + urllib.parse.quote("unicorn AND"))
    alert = _wait(
        driver,
        lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"),
    )
    assert alert.get_attribute("role") == "alert"
    assert alert.text and "Traceback" not in alert.text


def test_vocabulary_edit_and_fit_job(shapes_home: Path, driver, tmp_path: Path) -> None:
    """On a copy of the library: save a smaller vocabulary, run a fit job from the page and
    follow its progress to the end; then an index job on the same folder."""
    from selenium.webdriver.common.by import By

    _need_browser()
    home = tmp_path / "home"
    shutil.copytree(shapes_home, home, ignore=shutil.ignore_patterns("thumbnails"))
    with serve(home) as (url, key):
        base = url.split("#", 1)[0].rstrip("/")
        before = _api(base, key, "/api/vocabulary")["labels"]
        driver.get(url)
        _wait(driver, lambda d: "#key=" not in d.current_url)
        driver.get(base + "/#/vocabulary")
        area = _wait(driver, lambda d: d.find_element(By.ID, "vocab-labels"))
        _wait(driver, lambda d: area.get_attribute("value").strip() != "")
        assert area.get_attribute("value").split("\n") == before
        area.clear()
        area.send_keys("\n".join(before[:5]))
        driver.find_element(By.CSS_SELECTOR, "#vocab-form button").click()
        _wait(driver, lambda d: "Saved 5 labels" in d.find_element(By.ID, "vocab-state").text)
        assert "run a fit" in driver.find_element(By.ID, "vocab-state").text
        assert _api(base, key, "/api/vocabulary")["labels"] == before[:5]

        # A search now is refused (409 needs_fit): a message with a Fit button, no endless
        # "Searching…", no CLI command.
        driver.get(base + "/#/?q=" + urllib.parse.quote(f'"{before[0]}"'))
        needs = _wait(
            driver,
            lambda d: (
                d.find_element(By.ID, "needs-fit").is_displayed()
                and d.find_element(By.ID, "needs-fit")
            ),
        )
        assert "fit" in needs.text.lower() and "piaa" not in needs.text and "`" not in needs.text
        assert driver.find_element(By.ID, "needs-fit-button").is_displayed()
        assert "Searching" not in driver.find_element(By.ID, "result-count").text
        error = driver.find_element(By.ID, "error")
        assert not error.is_displayed(), error.text
        assert driver.find_element(By.ID, "fit-button").is_displayed()  # the banner's too

        driver.get(base + "/#/jobs")
        driver.find_element(By.CSS_SELECTOR, "#fit-form button").click()
        label = driver.find_element(By.ID, "job-label")
        _wait(driver, lambda d: label.text.startswith("Fitting: done"), timeout=120)
        bar = driver.find_element(By.ID, "job-progress")
        assert bar.get_attribute("value") == bar.get_attribute("max")
        # The result as sentences, not JSON.
        result = driver.find_element(By.ID, "job-result").text
        assert result.startswith("Fit done") and "images tagged" in result, result
        assert "{" not in result and "classifier_id" not in result
        _wait(driver, lambda d: "5 labels" in d.find_element(By.ID, "status").text)
        assert not _api(base, key, "/api/status")["stale"]

        folder = str(Path(_api(base, key, "/api/images?limit=1")["images"][0]["path"]).parent)
        box = driver.find_element(By.ID, "index-path")
        box.send_keys(folder)
        driver.find_element(By.CSS_SELECTOR, "#index-form button").click()
        _wait(driver, lambda d: label.text.startswith("Indexing: done"), timeout=120)
        result = driver.find_element(By.ID, "job-result").text
        assert result.startswith("Indexing done") and "48 unchanged" in result, result
        assert "{" not in result
        _screenshot(driver, "gallery-jobs.png")
        assert not driver.find_element(By.ID, "error").is_displayed()


def _row(driver, label: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    for row in driver.find_elements(By.CSS_SELECTOR, "#tags-table tbody tr"):
        if row.get_attribute("data-label") == label:
            return row
    raise AssertionError(f"no row for {label!r}")


def _pressed(driver, label: str, which: str) -> bool:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    button = _row(driver, label).find_element(By.CSS_SELECTOR, f"button.say.{which}")
    return button.get_attribute("aria-pressed") == "true"


def test_confirm_reject_and_fit_from_the_image_page(shapes_home: Path, driver, tmp_path) -> None:
    """On a copy of the library: search, open an image, confirm a tag (✓), reject another
    (✗), see them recorded as the gallery's labels; the Fit button appears, runs a fit job
    whose progress is a bar and whose result is a sentence; then → opens the next result."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _need_browser()
    home = tmp_path / "home"
    shutil.copytree(shapes_home, home, ignore=shutil.ignore_patterns("thumbnails"))
    with serve(home) as (url, key):
        base = url.split("#", 1)[0].rstrip("/")
        labels = _api(base, key, "/api/labels?prefix=&limit=100")["labels"]
        label = max(labels, key=lambda item: item["count"])["label"]
        driver.get(url)
        _wait(driver, lambda d: "#key=" not in d.current_url)
        _wait(driver, lambda d: "images" in d.find_element(By.ID, "status").text)
        assert not driver.find_element(By.ID, "fit-banner").is_displayed()  # nothing to fit
        # The landing page: the library, the latest images first.
        latest = [im["id"] for im in _api(base, key, "/api/images?order=newest&limit=48")["images"]]
        _wait(
            driver,
            lambda d: (
                [
                    int(li.get_attribute("data-id"))
                    for li in d.find_elements(By.CSS_SELECTOR, "#results li")
                ]
                == latest
            ),
        )
        assert "latest 48 images" in driver.find_element(By.ID, "result-count").text

        box = driver.find_element(By.ID, "q")
        box.send_keys(f'"{label}"')
        box.send_keys(Keys.ENTER)
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) > 1)
        ids = [
            int(li.get_attribute("data-id"))
            for li in driver.find_elements(By.CSS_SELECTOR, "#results li")
        ]
        # Cards: the calibrated confidence as a percentage, not a raw score.
        scores = [s.text for s in driver.find_elements(By.CSS_SELECTOR, "#results .score")]
        assert scores and all(re.fullmatch(r"(<1|>99|\d{1,3}) %", s) for s in scores), scores

        driver.find_element(By.CSS_SELECTOR, "#results li a").click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tags-table tbody tr")) > 1)
        image_id = ids[0]
        rows = driver.find_elements(By.CSS_SELECTOR, "#tags-table tbody tr")
        # (textContent: the other labels' rows are folded away, so .text is empty)
        confidences = [
            r.find_element(By.CSS_SELECTOR, "td.conf").get_attribute("textContent") for r in rows
        ]
        assert all(re.fullmatch(r"(<1|>99|\d{1,3}) %", c) for c in confidences), confidences
        # The first label not tagged (near the top, so the screenshot shows it).
        other = next(
            r.get_attribute("data-label")
            for r in rows
            if "present" not in (r.get_attribute("class") or "").split()
        )
        assert other != label
        # The other labels are folded away: unfold them to say no to one.
        driver.find_element(By.CSS_SELECTOR, "#other-tags summary").click()
        _wait(driver, lambda d: _row(d, other).is_displayed())

        # ✓ on the searched label, ✗ on the least likely one: recorded, shown, said by the API.
        _row(driver, label).find_element(By.CSS_SELECTOR, "button.say.yes").click()
        _wait(driver, lambda d: _pressed(d, label, "yes"))
        _row(driver, other).find_element(By.CSS_SELECTOR, "button.say.no").click()
        _wait(driver, lambda d: _pressed(d, other, "no"))
        assert "you: yes" in _row(driver, label).text and "you: no" in _row(driver, other).text
        given = _api(base, key, f"/api/images/{image_id}/labels")
        assert {(g["label"], g["present"], g["source"]) for g in given["labels"]} == {
            (label, True, "gallery"),
            (other, False, "gallery"),
        }
        assert given["labels_changed"] is True
        # A second click on ✓ takes it back; a third gives it again.
        _row(driver, label).find_element(By.CSS_SELECTOR, "button.say.yes").click()
        _wait(driver, lambda d: not _pressed(d, label, "yes"))
        _row(driver, label).find_element(By.CSS_SELECTOR, "button.say.yes").click()
        _wait(driver, lambda d: _pressed(d, label, "yes"))

        # The Fit button appears; it runs a fit job: a bar to the end, then a sentence.
        fit = _wait(
            driver,
            lambda d: (
                d.find_element(By.ID, "fit-button").is_displayed()
                and d.find_element(By.ID, "fit-button")
            ),
        )
        assert "labels changed" in driver.find_element(By.ID, "fit-why").text
        fit.click()
        bar = driver.find_element(By.ID, "fit-progress")
        _wait(driver, lambda d: d.find_element(By.ID, "fit-run").is_displayed())
        _wait(
            driver,
            lambda d: d.find_element(By.ID, "fit-label").text == "Fitting: done",
            timeout=180,
        )
        assert bar.get_attribute("value") == bar.get_attribute("max")
        summary = driver.find_element(By.ID, "fit-result").text
        assert summary.startswith("Fit done") and "Learnt from your labels of 1 image" in summary
        assert "{" not in summary and "classifier_id" not in summary  # a sentence, not JSON
        _wait(driver, lambda d: not d.find_element(By.ID, "fit-button").is_displayed())
        assert _api(base, key, "/api/status")["labels_changed"] is False
        # The page shows the image again after the fit, your labels still on it.
        _wait(driver, lambda d: _pressed(d, label, "yes") and _pressed(d, other, "no"))
        _wait(driver, lambda d: _images_loaded(d, "#evidence-img"))
        driver.execute_script("window.scrollTo(0, 0)")
        pixels = _screenshot(driver, "gallery-labels.png")
        assert pixels.std() > 20
        assert not driver.find_element(By.ID, "error").is_displayed()

        # → and ←: the next and the previous result.
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
        _wait(driver, lambda d: d.current_url.split("#", 1)[1].startswith(f"/image/{ids[1]}"))
        # (The page of ids[1] is shown once its own previous is ids[0].)
        _wait(
            driver,
            lambda d: d.find_element(By.ID, "view-image").get_attribute("data-prev") == str(ids[0]),
        )
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
        _wait(driver, lambda d: d.current_url.split("#", 1)[1].startswith(f"/image/{ids[0]}"))


def test_teach_a_concept_from_selected_results(shapes_home: Path, driver, tmp_path) -> None:
    """On a copy of the library: search a ShapesWorld class, tick 5 results, "Teach a concept
    from 5 selected…", name it in the inline form (a bad name is refused and nothing is
    stored), follow the fit job's bar to the end, then see the search for the new label."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _need_browser()
    home = tmp_path / "home"
    shutil.copytree(shapes_home, home, ignore=shutil.ignore_patterns("thumbnails"))
    with serve(home) as (url, key):
        base = url.split("#", 1)[0].rstrip("/")
        labels = _api(base, key, "/api/labels?prefix=&limit=100")["labels"]
        label = max(labels, key=lambda item: item["count"])["label"]  # a ShapesWorld class
        driver.get(url)
        _wait(driver, lambda d: "#key=" not in d.current_url)
        _wait(driver, lambda d: "images" in d.find_element(By.ID, "status").text)
        # The landing page's cards can be picked too; nothing is picked yet.
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li input.pick")) > 5)
        assert not driver.find_element(By.ID, "teach-bar").is_displayed()

        box = driver.find_element(By.ID, "q")
        box.send_keys(f'"{label}"')
        box.send_keys(Keys.ENTER)
        _wait(driver, lambda d: f"for {label}" in d.find_element(By.ID, "result-count").text
              or f'for "{label}"' in d.find_element(By.ID, "result-count").text)  # fmt: skip
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) >= 5)
        cards = driver.find_elements(By.CSS_SELECTOR, "#results li")[:5]
        chosen = [int(li.get_attribute("data-id")) for li in cards]
        # The first card, then Shift+click on the fifth picks the five (a range, as file
        # managers do).
        from selenium.webdriver.common.action_chains import ActionChains

        cards[0].find_element(By.CSS_SELECTOR, "input.pick").click()
        last = cards[4].find_element(By.CSS_SELECTOR, "input.pick")
        ActionChains(driver).key_down(Keys.SHIFT).click(last).key_up(Keys.SHIFT).perform()
        _wait(driver, lambda d: "5 selected" in d.find_element(By.ID, "teach-open").text)
        # A second click unpicks; a third picks again.
        cards[0].find_element(By.CSS_SELECTOR, "input.pick").click()
        _wait(driver, lambda d: "4 selected" in d.find_element(By.ID, "teach-open").text)
        cards[0].find_element(By.CSS_SELECTOR, "input.pick").click()
        opener = driver.find_element(By.ID, "teach-open")
        _wait(driver, lambda d: opener.text == "Teach a concept from 5 selected…")
        assert all("picked" in (li.get_attribute("class") or "") for li in cards)
        assert driver.current_url.split("#", 1)[1].startswith("/?")  # still on the results

        # The inline form (no window.prompt); a name the query language reserves is refused.
        opener.click()
        name = _wait(
            driver,
            lambda d: (
                d.find_element(By.ID, "teach-name").is_displayed()
                and d.find_element(By.ID, "teach-name")
            ),
        )
        assert driver.switch_to.active_element == name
        name.send_keys('say "hi"')
        name.send_keys(Keys.ENTER)
        alert = _wait(
            driver,
            lambda d: (
                d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error")
            ),
        )
        assert "reserved" in alert.text
        assert _api(base, key, "/api/user-labels?source=teach")["labels"] == []
        assert not driver.find_element(By.ID, "fit-run").is_displayed()

        name.clear()
        name.send_keys("my thing")
        driver.find_element(By.ID, "teach-submit").click()
        bar = driver.find_element(By.ID, "fit-progress")
        _wait(driver, lambda d: d.find_element(By.ID, "fit-run").is_displayed())
        _wait(
            driver,
            lambda d: d.find_element(By.ID, "fit-label").text == "Fitting: done",
            timeout=180,
        )
        assert bar.get_attribute("value") == bar.get_attribute("max")
        summary = driver.find_element(By.ID, "fit-result").text
        assert summary.startswith("Taught “my thing” from 5 images. Fit done"), summary

        # Then the search for the new label, its results shown.
        _wait(driver, lambda d: 'for "my thing"' in d.find_element(By.ID, "result-count").text)
        expected = _api(
            base,
            key,
            "/api/queries/search?"
            + urllib.parse.urlencode({"expression": '"my thing"', "limit": 48}),
        )["results"]
        assert expected, "the taught label tags some images"
        _wait(
            driver,
            lambda d: (
                [
                    int(li.get_attribute("data-id"))
                    for li in d.find_elements(By.CSS_SELECTOR, "#results li")
                ]
                == [row["id"] for row in expected]
            ),
        )
        assert not driver.find_element(By.ID, "teach-bar").is_displayed()  # taught: unpicked
        given = _api(base, key, "/api/user-labels?" + urllib.parse.urlencode({"label": "my thing"}))
        assert sorted(g["image"] for g in given["labels"]) == sorted(chosen)
        assert {(g["present"], g["source"]) for g in given["labels"]} == {(True, "teach")}
        assert "my thing" in _api(base, key, "/api/status")["vocabulary"]["labels"]
        assert not driver.find_element(By.ID, "error").is_displayed()
        _wait(driver, lambda d: _images_loaded(d, "#results img"))
        driver.execute_script("window.scrollTo(0, 0)")
        pixels = _screenshot(driver, "gallery-teach.png")
        assert pixels.std() > 20
