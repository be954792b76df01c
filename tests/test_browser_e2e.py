"""`caft browse` in a real browser: Debian's headless Chromium driven by Playwright.

The flow a person follows: open the page, filter, select three candidates with mouse and keys,
write a note, save, reload; the page shows the saved state and the selection file on disk holds
exactly those three and the note. A screenshot goes to $CAFT_SCREENSHOT (or the test's tmp folder).

Without chromium or playwright the tests skip, except in CI (CI=true), where they fail.
`CAFT_BROWSE_RUN_DIR=caft-runs/demo/seed_0` adds a screenshot of that real run (served by the
`caft browse` command on a copy of it, with the embedded model unless $CAFT_BROWSE_MODEL).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from caft.browse import CACHE_FILE, BrowseServer, find_candidates, open_review
from caft.io import read_json
from caft.selection import read_selection
from test_browse import EXPLANATIONS, _wait_for_url, make_run

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1440, "height": 900}


def _require_browser() -> None:
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package playwright is missing (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        problems.append(f"{CHROMIUM} is missing (apt-get install chromium)")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test, but {message}.")
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Debian's chromium, never a browser downloaded by `playwright install`.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def served_run(tmp_path, model, tokenizer):
    run_dir = make_run(tmp_path / "run")
    review = open_review(
        run_dir, model="tiny", loaded=(model, tokenizer), corpus=run_dir / "corpus.txt",
        n_examples=4, progress=False,
    )  # fmt: skip
    server = BrowseServer(review, port=0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server, run_dir
    server.shutdown()
    server.server_close()


def _open(browser, url: str):
    """A page on `url` that records every request elsewhere and every script error."""
    page = browser.new_page(viewport=VIEWPORT)
    page.elsewhere, page.errors = [], []
    page.on("request", lambda r: None if r.url.startswith(url) else page.elsewhere.append(r.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page


def _selected_ids(page) -> list[str]:
    page.wait_for_selector("#list .row")
    return page.eval_on_selector_all("#list .row.selected", "rows => rows.map(r => r.dataset.id)")


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = Path(os.environ.get("CAFT_SCREENSHOT") or tmp_path / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_filter_select_three_note_save_reload(browser, served_run, tmp_path):
    from playwright.sync_api import expect

    server, run_dir = served_run
    page = _open(browser, server.url)
    expect(page.locator("#list .row")).to_have_count(8)
    assert _selected_ids(page) == ["L0.1", "L1.2"]  # the contrast rule's file, as found
    expect(page.locator("#status")).to_contain_text("contrast-rule (test)")

    # Filter with the keyboard: '/' focuses the box; both pronoun candidates match.
    page.keyboard.press("/")
    page.keyboard.type("pronouns")
    expect(page.locator("#list .row")).to_have_count(2)
    page.keyboard.press("Enter")  # back to the list: the first match has the focus
    expect(page.locator("#list .row.focused")).to_have_attribute("data-id", "L0.1")
    page.keyboard.press("x")  # deselect L0.1
    assert _selected_ids(page) == ["L1.2"]
    expect(page.locator("#status")).to_have_text("unsaved changes")

    # Layer 1 only: select L1.3 with the mouse, then L1.0 with k k k and space.
    page.fill("#filter", "")
    page.select_option("#layer", "1")
    expect(page.locator("#list .row")).to_have_count(4)
    page.click('#list .row[data-id="L1.3"] input')
    expect(page.locator("#detail h2")).to_have_text("L1.3")
    expect(page.locator("#detail .explanation")).to_have_text(EXPLANATIONS["L1.3"])
    for _ in range(3):
        page.keyboard.press("k")
    expect(page.locator("#list .row.focused")).to_have_attribute("data-id", "L1.0")
    page.keyboard.press(" ")
    assert _selected_ids(page) == ["L1.0", "L1.2", "L1.3"]

    # A note on L1.3: 'n' focuses the note of the focused candidate.
    page.click('#list .row[data-id="L1.3"]')
    page.keyboard.press("n")
    page.keyboard.type("code, not gender: keep as a control")
    page.keyboard.press("Escape")
    page.check("#selected-only")
    expect(page.locator("#list .row")).to_have_count(3)
    note_row = page.locator('#list .row[data-id="L1.3"]')
    expect(note_row).to_have_class(re.compile(r"(?=.*\bselected\b)(?=.*\bhas-note\b)"))

    page.click("#save")
    expect(page.locator("#status")).to_contain_text("Saved 3 selected")
    assert read_selection(run_dir / "selection.json") == ["L1.0", "L1.2", "L1.3"]

    # Reload: the saved selection and note are what the page shows.
    page.reload()
    expect(page.locator("#list .row")).to_have_count(8)
    assert _selected_ids(page) == ["L1.0", "L1.2", "L1.3"]
    checked = page.eval_on_selector_all("#list .row input:checked", "boxes => boxes.length")
    assert checked == 3
    page.click('#list .row[data-id="L1.3"]')
    expect(page.locator("#note")).to_have_value("code, not gender: keep as a control")
    expect(page.locator("#toggle")).to_have_text("✓ Selected")
    expect(page.locator("#detail svg rect.bar").first).to_be_visible()

    data = read_json(run_dir / "selection.json")
    assert data["selected"] == ["L1.0", "L1.2", "L1.3"]
    notes = {row["id"]: row["note"] for row in data["scores"] if row["note"]}
    assert notes == {"L1.3": "code, not gender: keep as a control"}
    _screenshot(page, tmp_path, "browse.png")
    assert page.elsewhere == [] and page.errors == []


def test_a_refused_save_is_shown_and_changes_nothing(browser, served_run):
    from playwright.sync_api import expect

    server, run_dir = served_run
    before = (run_dir / "selection.json").read_bytes()
    page = _open(browser, server.url)
    page.wait_for_selector("#list .row")
    for cid in ("L0.1", "L1.2"):  # deselect both: nothing left to ablate
        page.click(f'#list .row[data-id="{cid}"] input')
    page.keyboard.press("Control+s")
    expect(page.locator("#status")).to_contain_text("Not saved: Nothing is selected")
    assert (run_dir / "selection.json").read_bytes() == before
    assert page.elsewhere == []


@pytest.mark.slow
def test_screenshot_of_a_real_run(browser, tmp_path):
    """Serve a copy of $CAFT_BROWSE_RUN_DIR with `caft browse` and screenshot a review of it."""
    from playwright.sync_api import expect

    source = os.environ.get("CAFT_BROWSE_RUN_DIR")
    if not source:
        pytest.skip("set CAFT_BROWSE_RUN_DIR to a run folder (e.g. a caft demo seed)")
    run_dir = tmp_path / "run"
    shutil.copytree(find_candidates(source), run_dir / "discovery" / "candidates")
    for name in ("selection.json", "autointerp.json", CACHE_FILE):
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, run_dir / name)
    command = [sys.executable, "-m", "caft", "browse", str(run_dir), "--port", "0", "--no-open"]
    command += ["--threads", "1"]
    if os.environ.get("CAFT_BROWSE_MODEL"):
        command += ["--model", os.environ["CAFT_BROWSE_MODEL"]]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = _wait_for_url(process, timeout=1800)
        page = _open(browser, url)
        page.wait_for_selector("#list .row")
        chosen = _selected_ids(page)
        assert chosen  # the run's own selection, as found
        page.click(f'#list .row[data-id="{chosen[0]}"]')
        page.keyboard.press("n")
        page.keyboard.type(os.environ.get("CAFT_BROWSE_NOTE", "Reviewed: keep."))
        page.keyboard.press("Escape")
        page.click("#save")
        expect(page.locator("#status")).to_contain_text("Saved")
        page.reload()
        assert _selected_ids(page) == chosen
        best_first = page.locator('#sort option[value="contrast"]').count()
        page.select_option("#sort", "contrast" if best_first else "layer")
        page.click(f'#list .row[data-id="{chosen[0]}"]')
        expect(page.locator("#note")).not_to_be_empty()
        path = _screenshot(page, tmp_path, "browse_real.png")
        print(f"screenshot: {path}")
        assert page.elsewhere == [] and page.errors == []
    finally:
        process.terminate()
        process.wait(timeout=60)
