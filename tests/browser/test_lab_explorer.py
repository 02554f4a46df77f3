"""Real-browser test: the layout explorer in JupyterLab, driven like a user.

Starts JupyterLab (``lab_server`` fixture), opens
``03_layout_explorer.ipynb`` in headless Chromium, runs all cells from the
*Run* menu, waits for the explorer, reads the layout and the memory
prediction from the page, types a new architecture into the explorer's text
field and checks that the page shows the new layout and a larger
conventional memory prediction.  A screenshot goes to
``tests/_artifacts/lab_explorer.png``.

This also proves that ``make lab`` needs no manual extension step: the
widgets only render if ipywidgets' JupyterLab extension is picked up from
the environment.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "_artifacts"

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOK = "03_layout_explorer.ipynb"
LAYOUT = ".iunet-layout pre"
MEMORY = ".iunet-memory pre"
# A sentence of the notebook's "What you just saw" summary (shown after every cell ran).
DONE_TEXT = "has exactly the requested channels (64, 128, 256, 384)"

README_2D_FIRST_ROW = "64-64-(32/32)--------------------------------------------------------(32/32)-64-64"


def conventional_bytes(memory_text: str) -> int:
    m = re.search(r"^conventional\s+[\d.]+ GiB\s+([\d,]+)", memory_text, re.M)
    assert m, memory_text
    return int(m.group(1).replace(",", ""))


def _dismiss_kernel_dialog(page) -> None:
    """Accept a kernel-selection dialog if JupyterLab shows one."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        accept = dialog.locator(".jp-Dialog-button.jp-mod-accept")
        if accept.count():
            accept.first.click()


def _run_all_cells(page) -> None:
    """Run → Run All Cells, through the menu bar."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
    item = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))
    item.first.wait_for(state="visible", timeout=10_000)
    item.first.click()


KERNEL_IDLE = """() => {
    const app = window.jupyterapp;
    const w = app && app.shell.currentWidget;
    const s = w && w.sessionContext;
    return !!(s && s.session && s.session.kernel && s.kernelDisplayStatus === 'idle');
}"""


def _wait_kernel_idle(page, timeout_ms: int) -> None:
    # window.jupyterapp exists because the server runs with expose_app_in_browser.
    page.wait_for_function(KERNEL_IDLE, timeout=timeout_ms, polling=250)


def _open_and_run_all(page, lab_server) -> None:
    """Open the notebook, wait for its kernel, run every cell and wait until all have run."""
    page.goto(lab_server.lab_url(NOTEBOOK), timeout=90_000)
    page.locator(".jp-NotebookPanel").first.wait_for(state="visible", timeout=90_000)
    # Wait until the kernel is connected and idle (accepting a kernel-selection dialog if one
    # shows up) before running anything.
    deadline = time.monotonic() + 90
    while not page.evaluate(KERNEL_IDLE):
        assert time.monotonic() < deadline, "the kernel did not start within 90 s"
        _dismiss_kernel_dialog(page)
        page.wait_for_timeout(500)
    _run_all_cells(page)
    page.locator(LAYOUT).first.wait_for(state="attached", timeout=120_000)
    # Wait for the whole notebook to finish, so that the kernel is free to answer the
    # widget changes.
    page.wait_for_function(f"() => document.body.textContent.includes({DONE_TEXT!r})",
                           timeout=150_000, polling=500)
    assert page.locator(LAYOUT).count() == 1


def _type_architecture(page, text: str, memory_before: str) -> tuple[str, str]:
    """Type ``text`` into the architecture field as a user does (click, select all, type, Enter);
    returns the layout and memory texts once the page shows three couplings per level and side."""
    field = page.locator(".iunet-architecture input")
    field.scroll_into_view_if_needed()
    field.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    page.wait_for_function(
        f"""() => {{
            const pre = document.querySelector({LAYOUT!r});
            return pre && pre.textContent.startsWith('64-64-64-(32/32)');
        }}""",
        timeout=60_000, polling=250)
    page.wait_for_function(
        f"""(before) => {{
            const pre = document.querySelector({MEMORY!r});
            return pre && pre.textContent !== before;
        }}""",
        arg=memory_before, timeout=30_000, polling=250)
    return page.locator(LAYOUT).inner_text(), page.locator(MEMORY).inner_text()


def _build_and_check(page) -> str:
    """Click *Build and check* and return the text the kernel shows once it has built the model."""
    _wait_kernel_idle(page, 30_000)
    page.locator(".iunet-build-button").click()
    build = page.locator(".iunet-build pre")
    build.wait_for(state="attached", timeout=60_000)
    return build.inner_text()


def test_explorer_in_jupyterlab(lab_server, chromium_browser):
    t0 = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "lab_explorer.png"
    context = chromium_browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    try:
        _open_and_run_all(page, lab_server)
        explorer = page.locator(".iunet-explorer")
        explorer.scroll_into_view_if_needed()
        layout_before = page.locator(LAYOUT).inner_text()
        memory_before = page.locator(MEMORY).inner_text()
        assert layout_before.splitlines()[0] == README_2D_FIRST_ROW, layout_before
        for mode in ("conventional", "fused", "memcnn"):
            assert mode in memory_before
        conv_before = conventional_bytes(memory_before)
        # The chart is an <img> showing the PNG drawn by the kernel.
        chart = page.locator("img.iunet-memory-chart")
        assert chart.count() == 1
        assert chart.evaluate("img => img.complete && img.naturalWidth > 100")

        layout_after, memory_after = _type_architecture(page, "3, 3, 3, 3", memory_before)
        rows = layout_after.splitlines()
        assert len(rows) == 4
        # Three coupling layers per side at every level now.
        assert rows[0].startswith("64-64-64-(32/32)") and rows[0].endswith("(32/32)-64-64-64")
        assert "128-128-128-(64/64)" in rows[1]
        assert "384-384-384--384-384-384" in rows[3]
        conv_after = conventional_bytes(memory_after)
        assert conv_after > conv_before, (memory_before, memory_after)

        # Build and check: the kernel builds the model and inverts its output.
        build_text = _build_and_check(page)
        m = re.search(r"max\|inverse\(forward\(x\)\) - x\| = ([0-9.e+-]+)", build_text)
        assert m, build_text
        assert float(m.group(1)) < 1e-5, build_text
        assert "matches the prediction" in build_text, build_text

        _wait_kernel_idle(page, 30_000)
        page.wait_for_timeout(300)  # let the chart's new image paint
        explorer.scroll_into_view_if_needed()
        page.screenshot(path=str(screenshot))
        print(f"\nscreenshot: {screenshot}")
        print(f"conventional prediction: {conv_before:,d} -> {conv_after:,d} bytes; "
              f"browser test took {time.monotonic() - t0:.1f} s")
    except Exception:
        try:
            page.screenshot(path=str(ARTIFACTS / "lab_explorer_failure.png"), full_page=True)
        except Exception:
            pass
        print("browser console (last 40):\n" + "\n".join(console[-40:]))
        print("jupyter lab log (tail):\n" + lab_server.log_tail())
        raise
    finally:
        context.close()
