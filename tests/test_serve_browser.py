"""``textok serve`` in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Starts the verb as a user would (``textok serve --model ... --port 0`` in a subprocess), then loads the page,
uploads an image, types captions, runs them and checks the reconstructions (one named column per model, the PSNR
summary row, colour legends, download buttons), the caption swap, a bad upload and samples from a generator per
tokenizer. Nothing is downloaded: Playwright drives the system browser (never ``playwright install``), and every
request the page makes to another host is blocked and fails the test.

Skipped, with the reason, where Playwright or the browser is missing; under CI (``CI=true``; ``.ci/run``
installs both) a missing browser fails instead. Models: tiny random ones made here, or trained ones from
``TEXTOK_SERVE_MODELS`` (comma-separated directories) and ``TEXTOK_SERVE_GENERATOR``. ``TEXTOK_SCREENSHOT=PATH``
also writes the final screenshot there (docs/serve.png was made that way from the demo's models).
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from serve_models import make_models

from textok.apps.serve.app import model_name
from textok.data.scenes import captions_for, make_scene, render_scene

CHROMIUM = os.environ.get("TEXTOK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser test (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        _missing(f"no system Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser):
    env_models = [m for m in os.environ.get("TEXTOK_SERVE_MODELS", "").split(",") if m]
    root = tmp_path_factory.mktemp("serve-browser")
    paths = make_models(root, generator=not env_models, text_generator=not env_models)
    models = env_models or [str(paths["text"]), str(paths["notext"])]
    generators = [g for g in os.environ.get("TEXTOK_SERVE_GENERATOR", "").split(",") if g] or \
        [str(paths[k]) for k in ("generator_text", "generator") if k in paths]
    cmd = [sys.executable, "-c", "import sys; from textok.cli import main; sys.exit(main())", "serve", "--port", "0",
           "--model", str(paths["bad"])]
    for m in models:
        cmd += ["--model", m]
    for g in generators:
        cmd += ["--generator", g]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # the process ended

    threading.Thread(target=read, daemon=True).start()
    url, log = None, []
    try:
        while url is None:
            line = lines.get(timeout=180)
            if line is None:
                raise queue.Empty
            log.append(line)
            if "ready at " in line:
                url = line.split("ready at ", 1)[1].split()[0]
        yield url, [model_name(m) for m in models], len(generators)
    except queue.Empty:
        pytest.fail("textok serve did not start:\n" + "".join(log))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 143, "".join(log)  # SIGTERM: the requests finish, then it exits as every verb does


def _scene_png(path: Path, index: int = 7) -> str:
    scene = make_scene(0, "test", index)
    render_scene(scene, 96).save(path)
    return captions_for(scene)[0]


def test_the_page_in_chromium(browser, server, tmp_path):
    url, names, generators = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    elsewhere: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(url) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert "is corrupt" in page.inner_text(".card.failed")  # the model directory that did not load

    text_card, plain_card = (f".card[data-model='{n}']" for n in names[:2])
    caption = _scene_png(tmp_path / "scene.png")
    page.set_input_files("#upload", str(tmp_path / "scene.png"))
    page.wait_for_selector(f"{plain_card} img.recon")
    assert "center-cropped" not in page.inner_text("#working-notes") and "96×96" in page.inner_text("#working-notes")
    # After an upload the caption box waits for the user (focused), not a red refusal from the text model.
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'caption'", timeout=10_000)
    assert page.is_visible(f"{text_card} .wait") and not page.query_selector(f"{text_card} .msg")
    assert "describe the image" in page.inner_text("#message") and "note" in page.get_attribute("#message", "class")

    page.fill("#caption", caption)
    page.click("#run")
    page.wait_for_selector(f"{text_card} img.recon")
    first = page.get_attribute(f"{text_card} img.recon", "src")
    plain = page.get_attribute(f"{plain_card} img.recon", "src")
    assert first.startswith("data:image/png;base64,") and "dB" in page.inner_text(text_card)

    # One column per model, named apart, with kind and tokens; side by side; a PSNR row above them.
    titles = page.eval_on_selector_all(".card h3", "hs => hs.map(h => h.textContent)")
    assert len(set(titles)) == len(titles) and len(titles) >= 3, titles
    boxes = [page.locator(sel).bounding_box() for sel in (text_card, plain_card)]
    assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2 and boxes[0]["x"] != boxes[1]["x"]  # columns, not rows
    assert "textok" in page.inner_text(f"{text_card} .meta") and "bits per image" in page.inner_text(f"{text_card} .meta")
    for sel, name in ((text_card, names[0]), (plain_card, names[1])):
        psnr_cell = page.inner_text(f"#summary td[data-model='{name}']")
        assert psnr_cell.endswith("dB") and psnr_cell in page.inner_text(f"{sel} figcaption >> nth=1")
        assert page.locator(f"{sel} img.recon").bounding_box()["width"] >= 140  # bigger pictures (were 112 px)
        # colour legends: the heat map's scale and the tokens' range, drawn with the pictures' own colours
        assert page.locator(f"{sel} .heat-legend .bar").evaluate("b => getComputedStyle(b).backgroundImage").startswith("linear-gradient")
        assert "levels" in page.inner_text(f"{sel} .heat-legend") and "0" in page.inner_text(f"{sel} .tokens-legend")
    with page.expect_download() as download:
        page.click(f"{text_card} figure:has(img.recon) a.download")
    assert download.value.suggested_filename.endswith("-reconstruction.png")
    saved = tmp_path / "downloaded.png"
    download.value.save_as(saved)
    with Image.open(saved) as im:  # the model's own pixels, at its size
        assert im.format == "PNG" and im.width == page.locator(f"{text_card} img.recon").evaluate("i => i.naturalWidth")

    page.fill("#caption", "A small black ring at the top left on a plain white background.")
    page.click("#run")
    page.wait_for_function("([sel, old]) => document.querySelector(sel).src !== old",
                           arg=[f"{text_card} img.recon", first], timeout=30_000)
    assert page.get_attribute(f"{plain_card} img.recon", "src") == plain  # the no-text model ignores captions

    page.fill("#caption", caption)
    page.click("#suggest")
    assert page.input_value("#swap") and page.input_value("#swap") != caption
    page.click("#run")
    page.wait_for_selector(f"{text_card} img.swap-recon")
    assert page.get_attribute(f"{text_card} img.recon", "src") == first  # same caption, same reconstruction
    assert "what changed" in page.inner_text(text_card) and "cannot change" in page.inner_text(plain_card)

    if page.is_visible("#generator"):
        page.fill("#gen-n", "4")
        page.fill("#gen-steps", "10")
        page.click("#sample")
        page.wait_for_selector(f"#samples [data-generator='{generators - 1}'] img.sample >> nth=3", timeout=60_000)
        for g in range(generators):  # a column of samples for every generator, named by its tokenizer
            assert page.locator(f"#samples [data-generator='{g}'] img.sample").count() == 4
        if not os.environ.get("TEXTOK_SERVE_MODELS"):
            sample_titles = page.eval_on_selector_all("#samples h3", "hs => hs.map(h => h.textContent)")
            assert sorted(sample_titles) == sorted(names[:2]), sample_titles

    shot = page.screenshot(full_page=True)
    with Image.open(io.BytesIO(shot)) as im:
        assert im.width == 1280 and im.height >= 600
    if os.environ.get("TEXTOK_SCREENSHOT"):
        with Image.open(io.BytesIO(shot)) as im:  # a palette PNG keeps the README's picture small
            im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
                os.environ["TEXTOK_SCREENSHOT"], optimize=True)

    (tmp_path / "notes.txt").write_text("hello")
    page.set_input_files("#upload", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#message:not([hidden])")
    assert "not an image" in page.inner_text("#message")
    assert page.get_attribute(f"{text_card} img.recon", "src") == first  # the last good result stays

    Image.new("RGB", (1500, 900), (20, 160, 60)).save(tmp_path / "big.png")
    page.set_input_files("#upload", str(tmp_path / "big.png"))
    page.wait_for_function("() => document.querySelector('#working-notes').textContent.includes('large image')")
    assert "resized to 512×512" in page.inner_text("#message")  # shown as a note, not an error
    page.wait_for_function("([sel, old]) => document.querySelector(sel).src !== old",
                           arg=[f"{text_card} img.recon", first], timeout=30_000)

    page.fill("#caption", "")
    page.click("#run")
    page.wait_for_selector(f"{text_card} .wait")
    assert "type a caption" in page.inner_text(text_card) and page.is_visible(f"{plain_card} img.recon")
    assert not errors, errors
    assert not elsewhere, f"the page tried to reach other hosts: {elsewhere}"
    page.close()
