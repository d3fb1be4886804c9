"""The upload page in a real browser: Debian's Chromium, driven by Playwright.

Chromium is installed through the machine's package manager when it is missing (Playwright's own
browser download cannot reach the internet from here, and is not what users run). A screenshot of
the answered page is written to test-artifacts/page.png.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests
from commands import debian_tool
from playwright.sync_api import expect
from serving import KEY

ARTIFACTS = Path(os.environ.get("SKINRAY_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
# Headless, as root in a container, and quiet on a machine whose network is closed.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def system_chromium() -> str:
    """/usr/bin/chromium, installed with apt-get when missing."""
    return debian_tool("chromium", "chromium")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = system_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    yield context.new_page()
    context.close()


def test_the_page_answers_an_upload_and_shows_a_readable_error(page, endpoint, photos, tmp_path):
    expected = requests.post(
        f"{endpoint}/v1/predict", data=photos[0].read_bytes(), headers={"Content-Type": "image/jpeg"}
    ).json()
    page.goto(f"{endpoint}/")
    expect(page.locator("#version")).to_contain_text("member")
    page.set_input_files("#file", str(photos[0]))
    page.wait_for_selector("#result", state="visible", timeout=60_000)
    assert page.text_content("#label") == expected["label"]
    assert page.text_content("#confidence") == f"{100 * expected['confidence']:.1f}% confidence"
    assert page.is_visible("#refer") == expected["abstained"]
    assert len(page.query_selector_all("#top-k li")) == len(expected["top_k"])
    assert page.text_content("#differential") == ", ".join(expected["differential"])
    assert "holds the true one for 90% of images" in page.text_content("#differential-panel")
    overlay = page.locator("#overlay")
    expect(overlay).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    assert overlay.evaluate("img => img.decode().then(() => img.naturalWidth)") >= 320
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)

    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not a photo")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    message = page.text_content("#error")
    assert message.startswith("notes.txt: ") and "not a readable image" in message
    assert "Traceback" not in message and page.is_hidden("#result")


def test_the_page_asks_for_the_key_and_sends_it_as_a_header(page, keyed, photos):
    sent = []
    page.on("request", lambda request: sent.append(request))
    page.goto(f"{keyed}/")
    page.wait_for_selector("#key-panel", state="visible")
    assert "API key" in page.text_content("#error")
    page.fill("#key", KEY)
    page.click("#save-key")
    expect(page.locator("#version")).to_contain_text("member")
    page.set_input_files("#file", str(photos[1]))
    page.wait_for_selector("#result", state="visible", timeout=60_000)
    assert re.fullmatch(r"\d+\.\d% confidence", page.text_content("#confidence"))
    explain = [r for r in sent if r.url.endswith("/keyed/v1/explain")]
    assert explain and explain[-1].headers.get("x-api-key") == KEY
    assert all(KEY not in r.url for r in sent)
