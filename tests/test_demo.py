"""lungtf.demo: page content from real predictions, example discovery, and the page itself in
headless Chromium against a live dev server serving a tiny exported model."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import png_bomb, write_tile
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from test_serving import launch, wait_ready

from lungtf import demo, demo_evidence, export
from lungtf.client import LungClient, LungClientError, Prediction
from lungtf.config import ModelConfig
from lungtf.constants import CLASS_NAMES
from lungtf.models import build_model
from lungtf.overlay import overlay

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
METADATA = {
    "backbone": "resnet34",
    "split_protocol": "grouped",
    "uncertainty_threshold": 0.99,
    "test_metrics": {
        "accuracy": 0.953,
        "loss": 0.21,
        "missed_cancers": 3,
        "benign_called_cancer": 2,
        "n": 602,
    },
}


def prediction(probs: tuple[float, float, float]) -> Prediction:
    best = max(range(3), key=lambda i: probs[i])
    return Prediction(CLASS_NAMES[best], best, dict(zip(CLASS_NAMES, probs)))


def test_tile_shows_words_bars_and_uncertainty_flag() -> None:
    confident = prediction((0.05, 0.12, 0.83))
    assert demo.format_probability(0.8349) == "83.5%"
    assert not demo.is_uncertain(confident, 0.6)
    assert demo.is_uncertain(confident, 0.9)
    assert not demo.is_uncertain(confident, None)
    page = demo.render_results([demo.TileResult("a.png", confident)], 0.6)
    assert "squamous cell carcinoma</b> (lung_scc)" in page
    assert [f"{p}%" for p in ("5.0", "12.0", "83.0")] == [
        part.split("</span>")[0] for part in page.split('class="lungtf-prob">')[1:]
    ]
    assert demo.UNCERTAIN not in page
    flagged = demo.render_tile(demo.TileResult("a.png", prediction((0.41, 0.2, 0.39))), 0.6)
    assert demo.UNCERTAIN in flagged and "41.0% is below the threshold 60.0%" in flagged


def test_evidence_overlay_sits_beside_the_bars() -> None:
    uri = "data:image/png;base64,iVBORw0KGgo="
    page = demo.render_tile(demo.TileResult("a.png", prediction((0.1, 0.1, 0.8)), overlay=uri), None)
    assert page.index('class="lungtf-body"') < page.index(f'class="lungtf-overlay" src="{uri}"')
    assert 'alt="evidence for a.png"' in page
    assert "lungtf-overlay" not in demo.render_tile(demo.TileResult("a.png", prediction((1, 0, 0))), None)


def test_errors_and_names_are_escaped_and_shown() -> None:
    bad = demo.TileResult("<x>.png", error="INVALID_ARGUMENT: cannot decode <image>")
    page = demo.render_results([bad], 0.5, alert="Cannot reach the model server at h:1")
    assert "&lt;x&gt;.png" in page and "<x>" not in page
    assert "cannot decode &lt;image&gt;" in page
    assert page.index("lungtf-alert") < page.index("lungtf-tile")
    assert "click an example" in demo.render_results([], None)


def test_footer_states_version_metrics_protocol_and_disclaimer() -> None:
    text = demo.footer_text(dict(METADATA, backbone="resnet34"), 4, "127.0.0.1:8500")
    for part in (
        "`resnet34` version 4",
        "95.3%",
        "602 held-out",
        "missed cancers:** 3",
        "grouped",
        "99.0%",
        demo.DISCLAIMER,
    ):
        assert part in text
    leaky = demo.footer_text({"split_protocol": "random (leaky)"}, None, "h:1")
    assert "inflated" in leaky and "version unknown" in leaky and "not recorded" in leaky
    assert "no tile is flagged" in leaky
    down = demo.footer_text(None, None, "h:1", "Cannot reach the model server at h:1")
    assert "Cannot reach the model server at h:1" in down and demo.DISCLAIMER in down


def test_served_version_is_newest_available() -> None:
    status = {
        "versions": [
            {"version": 3, "state": "AVAILABLE"},
            {"version": 5, "state": "LOADING"},
            {"version": 2, "state": "AVAILABLE"},
        ]
    }
    assert demo.served_version(status) == 3
    assert demo.served_version({"versions": []}) is None


def test_examples_from_folders_and_run_test_split(tiny_folder: Path, tmp_path: Path) -> None:
    found = demo.find_examples([tiny_folder / "lung_n"], per_source=3)
    assert [caption for _, caption in found] == ["lung_n"] * 3
    assert all(Path(p).is_absolute() and Path(p).parent.name == "lung_n" for p, _ in found)
    root = demo.find_examples([tiny_folder], per_source=4)
    assert [caption for _, caption in root] == [*CLASS_NAMES, "lung_aca"]
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "splits.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group", "split", "protocol"])
        for c, name in enumerate(CLASS_NAMES):
            for i in range(4):
                split = "test" if i < 2 else "train"
                path = tiny_folder / name / f"{name}{i}.jpeg"
                rel = Path("..") / path.relative_to(tmp_path) if c == 0 else path
                writer.writerow([rel, name, f"g{c}{i}", split, "grouped"])
    picked = demo.find_examples(run_dir=run, per_source=4, data_root=tiny_folder)
    assert [c for _, c in picked] == [f"test: {n}" for n in (*CLASS_NAMES, "lung_aca")]
    assert picked[0][0] == str((tiny_folder / "lung_aca" / "lung_aca0.jpeg").resolve())
    assert picked[3][0].endswith("lung_aca1.jpeg")
    with pytest.raises(FileNotFoundError, match="splits.csv"):
        demo.find_examples(run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-root"):  # no config.yaml naming the data
        demo.find_examples(run_dir=run)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        demo.find_examples([tmp_path / "nowhere"])


def test_examples_are_only_jpeg_png_files_inside_their_folder(tmp_path: Path) -> None:
    """A symlink leading out, a non-image, a renamed text file and hostile splits.csv rows
    (absolute, ``..``, a symlinked folder) are never examples, so the page never serves them."""
    secret = write_tile(tmp_path / "private" / "patient.png", seed=1)
    (tmp_path / "private" / "notes.png").write_text("not an image")
    folder = tmp_path / "examples" / "lung_n"
    tile = write_tile(folder / "n0.jpeg", seed=2)
    (folder / "link.png").symlink_to(secret)
    (folder / "renamed.png").write_text("text, not a PNG")
    (folder / "page.html").write_text("<html></html>")
    (folder.parent / "outside").symlink_to(tmp_path / "private", target_is_directory=True)
    found = demo.find_examples([folder.parent], per_source=10)
    assert [p for p, _ in found] == [str(tile.resolve())]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  data: {folder.parent}\n")
    rows = [tile, secret, Path("../private/patient.png"), Path("/etc/passwd"),
            folder.parent / "outside" / "patient.png", folder / "link.png"]  # fmt: skip
    with open(run / "splits.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group", "split", "protocol"])
        writer.writerows([row, "lung_n", f"g{i}", "test", "grouped"] for i, row in enumerate(rows))
    assert [p for p, _ in demo.find_examples(run_dir=run)] == [str(tile.resolve())]


def test_thumbnails_open_only_small_jpeg_and_png(tmp_path: Path) -> None:
    tile = write_tile(tmp_path / "a.jpeg", seed=3, size=300)
    assert demo.thumbnail_uri(tile).startswith("data:image/jpeg;base64,")
    Image.open(tile).save(tmp_path / "a.gif")
    Image.open(tile).save(tmp_path / "a.bmp")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    start = time.monotonic()
    assert [demo.thumbnail_uri(tmp_path / n) for n in ("a.gif", "a.bmp", "bomb.png")] == [None] * 3
    assert time.monotonic() - start < 1  # the bomb is refused from its header, not decoded


def test_command_line_defaults_and_bad_examples(tmp_path: Path, capsys) -> None:
    args = demo.parse_args(["--target", "127.0.0.1:9"])
    assert (args.host, args.port, args.examples, args.run) == ("127.0.0.1", 7860, [], None)
    assert demo.main(["--target", "127.0.0.1:9", "--examples", str(tmp_path / "none")]) == 2
    assert "--examples folder not found" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unsaturated_model(tiles: list[Path], size: int = 32) -> keras.Model:
    """``build_model`` resnet34 (random weights, 32 px) with its ``logits`` kernel scaled so that
    the logits on ``tiles`` have standard deviation 2: an untrained resnet answers 1.0/0.0/0.0,
    which would make comparing displayed probabilities trivial."""
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(backbone="resnet34", weights="none", image_size=size))
    pixels = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((size, size)), "float32") for p in tiles]
    )
    logits = model.get_layer("logits")
    kernel, bias = logits.get_weights()
    spread = float(np.std(keras.Model(model.input, logits.output)(pixels)))
    logits.set_weights([kernel * 2.0 / spread, bias])
    return model


LEGACY = "legacy"
"""The second served model of ``live``: the same export without the ``explain`` signature, as a
model exported before it existed."""
LEGACY_SIGNATURES = ("serving_default", "predict_pixels", "metadata")


def save_without_explain(version: Path, base: Path) -> None:
    """Re-save an exported version with only ``LEGACY_SIGNATURES`` as ``base/1`` (renamed into
    place, so the polling server never sees half a model)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version))
    tmp = base.parent / f".{base.name}-tmp"
    tf.saved_model.save(loaded, str(tmp), signatures={k: loaded.signatures[k] for k in LEGACY_SIGNATURES})
    base.mkdir()
    tmp.rename(base / "1")


def wait_available(target: str, model_name: str, timeout: float = 120.0) -> None:
    client = LungClient(target, model_name=model_name)
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        try:
            if demo.served_version(client.status()) is not None:
                return client.close()
        except LungClientError as err:  # NOT_FOUND until the server has polled the base path
            state = str(err)
        time.sleep(0.3)
    pytest.fail(f"model {model_name!r} never became AVAILABLE at {target}: {state}")


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict]:
    """A tiny resnet34 exported and served by the dev server (as ``lungtf``, and without
    ``explain`` as ``LEGACY``), the demo page in this process, and a tile to upload (a real
    LC25000 tile when the shared data is there).

    The server starts first and imports TensorFlow while the model is built and exported.
    """
    root = tmp_path_factory.mktemp("demo")
    (root / "lungtf").mkdir(parents=True)
    config = root / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{root / name}" model_platform: "tensorflow" }}\n'
        for name in ("lungtf", LEGACY)
    ) + "}\n")  # fmt: skip
    proc = launch(["--config", str(config), "--poll-seconds", "0.3"], root / "server.log")
    try:
        shared = request.getfixturevalue("shared_data")
        tile = shared / "lung_aca" / "lungaca1.jpeg"
        example_dir = shared / "lung_n"
    except pytest.skip.Exception:
        tile = write_tile(root / "upload" / "tile.jpeg", seed=1, size=64)
        example_dir = root / "lung_n"
        for i in range(5):  # 4 examples, and one tile beside them that is not an example
            write_tile(example_dir / f"n{i}.png", seed=10 + i, size=64, cls=1)
    examples = demo.find_examples([example_dir], per_source=4)
    tiles = [tile, *(Path(path) for path, _ in examples)]
    export.export_model(unsaturated_model(tiles), root / "lungtf", dict(METADATA))
    save_without_explain(root / "lungtf" / "1", root / LEGACY)
    target = wait_ready(proc, root / "server.log")
    wait_available(target, LEGACY)
    backend = demo.DemoBackend(target)
    app = demo.build_app(backend, examples)
    url = demo.launch(app, "127.0.0.1", free_port(), examples, block=False)
    broken = root / "broken.jpeg"
    broken.write_bytes(b"not an image at all")
    yield {
        "proc": proc,
        "target": target,
        "url": url,
        "tile": tile,
        "backend": backend,
        "examples": examples,
        "broken": broken,
        "app": app,
    }
    app.close()
    backend.client.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_backend_answers_good_tiles_and_names_undecodable_ones(live: dict) -> None:
    page, footer = live["backend"].classify([str(live["tile"]), str(live["broken"])])
    direct = LungClient(live["target"]).predict([live["tile"]])[0]
    assert f"({direct.label})" in page and demo.UNCERTAIN in page
    broken = page[page.index('data-name="broken.jpeg"') :]
    assert "The server rejected this file: INVALID_ARGUMENT" in broken
    assert "lungtf-prob" not in broken
    assert "version 1" in footer and "95.3%" in footer
    app = live["app"]
    assert (app.analytics_enabled, app.share, app.server_name) == (False, False, "127.0.0.1")
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_too_many_files_at_once_are_refused(live: dict) -> None:
    tiles = [str(live["tile"])] * (demo.MAX_FILES_PER_UPLOAD + 1)
    page, _ = live["backend"].classify(tiles)
    assert f"{len(tiles)} files at once; at most {demo.MAX_FILES_PER_UPLOAD}" in page
    assert "lungtf-tile" not in page  # refused as a whole: no Predict call made


def test_page_serves_its_example_files_and_nothing_beside_them(live: dict) -> None:
    example = Path(live["examples"][0][0])
    shown = dict(live["examples"])
    beside = min(p for p in example.parent.iterdir() if str(p.resolve()) not in shown)

    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{live['url']}gradio_api/file={path}", timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status(example) == 200
    assert status(beside) in (403, 404)
    assert status(Path("/etc/hostname")) in (403, 404)


def test_uploads_go_to_a_private_cache_that_is_emptied(live: dict) -> None:
    app = demo.build_app(live["backend"], live["examples"], cache_seconds=(1, 1))
    url = demo.launch(app, "127.0.0.1", free_port(), live["examples"], block=False)
    try:
        cache = Path(os.environ["GRADIO_TEMP_DIR"])
        assert cache != Path(tempfile.gettempdir()) / "gradio"
        assert cache.stat().st_mode & 0o777 == 0o700  # other local users cannot list or read it
        boundary = "lungtf-test-boundary"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f'filename="tile.jpeg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode() + live["tile"].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        upload = urllib.request.Request(
            f"{url}gradio_api/upload", data=body, method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )  # fmt: skip
        with urllib.request.urlopen(upload, timeout=30) as response:
            (stored,) = json.loads(response.read())
        assert Path(stored).is_file() and Path(stored).is_relative_to(cache)
        deadline = time.monotonic() + 15
        while Path(stored).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(stored).exists(), "the upload was never deleted"
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Debian Chromium through chromedriver, with a fresh profile; skips without them."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"no browser: needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium "
            "chromium-driver)"
        )
    profile = Path(tempfile.mkdtemp(prefix="lungtf-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_until(driver: webdriver.Chrome, condition, what: str, artifacts: Path, timeout=60.0):
    """Wait for ``condition``; on a time-out save ``demo_timeout.png`` and fail with the page text."""
    try:
        return WebDriverWait(driver, timeout).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(artifacts / "demo_timeout.png"))
        body = driver.find_element(By.TAG_NAME, "body").text[-2000:]
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; page text:\n{body}")


def open_page(driver: webdriver.Chrome, url: str, artifacts: Path) -> None:
    """Load the page and wait until its load event has filled the footer (the app is live)."""
    driver.get(url)
    wait_until(
        driver,
        ec.text_to_be_present_in_element((By.ID, "lungtf-footer"), "not a diagnosis"),
        "the footer",
        artifacts,
    )
    wait_until(
        driver,
        ec.element_to_be_clickable((By.CSS_SELECTOR, "#lungtf-examples img")),
        "the example gallery",
        artifacts,
    )


def shown_probabilities(driver: webdriver.Chrome, name: str, artifacts: Path) -> dict[str, str]:
    """Wait for the result block of tile ``name``; its displayed probability per class."""
    css = f'#lungtf-results [data-name="{name}"] .lungtf-prob'
    wait_until(driver, ec.presence_of_element_located((By.CSS_SELECTOR, css)), name, artifacts)
    tile = driver.find_element(By.CSS_SELECTOR, f'#lungtf-results [data-name="{name}"]')
    return {
        bar.get_attribute("data-class"): bar.find_element(By.CLASS_NAME, "lungtf-prob").text
        for bar in tile.find_elements(By.CLASS_NAME, "lungtf-bar")
    }


def direct_probabilities(target: str, path: str | Path) -> tuple[Prediction, dict[str, str]]:
    """A direct gRPC call for ``path``, and its probabilities as the page formats them."""
    client = LungClient(target)
    pred = client.predict([path])[0]
    client.close()
    return pred, {c: demo.format_probability(p) for c, p in pred.probabilities.items()}


def upload(driver: webdriver.Chrome, *paths: Path) -> None:
    """Put files in the upload box, as a person choosing several files at once."""
    box = driver.find_element(By.CSS_SELECTOR, "#lungtf-upload input[type=file]")
    box.send_keys("\n".join(map(str, paths)))


def test_browser_upload_matches_direct_grpc_call(live: dict, browser, artifacts_dir: Path) -> None:
    open_page(browser, live["url"], artifacts_dir)
    upload(browser, live["tile"], live["broken"])
    name = live["tile"].name
    shown = shown_probabilities(browser, name, artifacts_dir)
    broken = browser.find_element(By.CSS_SELECTOR, '#lungtf-results [data-name="broken.jpeg"]')
    assert "The server rejected this file: INVALID_ARGUMENT" in broken.text
    direct, expected = direct_probabilities(live["target"], live["tile"])
    assert shown == expected
    result = browser.find_element(By.CSS_SELECTOR, f'#lungtf-results [data-name="{name}"]').text
    assert demo.CLASS_DESCRIPTIONS[direct.label] in result and demo.UNCERTAIN in result
    footer = browser.find_element(By.ID, "lungtf-footer").text
    for part in ("resnet34", "version 1", "95.3%", "missed cancers: 3", "grouped"):
        assert part in footer
    browser.save_screenshot(str(artifacts_dir / "demo_upload.png"))

    browser.find_elements(By.CSS_SELECTOR, "#lungtf-examples img")[0].click()
    example = live["examples"][0][0]
    shown = shown_probabilities(browser, Path(example).name, artifacts_dir)
    assert shown == direct_probabilities(live["target"], example)[1]


def overlay_in(block: str) -> Image.Image | None:
    """The evidence overlay image in a tile's HTML, decoded; ``None`` when there is none."""
    marker = 'class="lungtf-overlay" src="data:image/png;base64,'
    if marker not in block:
        return None
    data = block.split(marker, 1)[1].split('"', 1)[0]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def probabilities_in(page: str) -> list[str]:
    """The probabilities a results page shows, in order."""
    return re.findall(r'class="lungtf-prob">([^<]*)<', page)


def test_backend_with_explain_draws_the_served_heatmap(live: dict) -> None:
    backend, tile = live["backend"], live["tile"]
    assert backend.evidence() == (True, "")
    page, _ = backend.classify([str(tile), str(live["broken"])], evidence=True)
    plain, _ = backend.classify([str(tile)])
    assert len(probabilities_in(page)) == 3 and probabilities_in(page) == probabilities_in(plain)
    good, broken = page.split('data-name="broken.jpeg"')
    drawn = overlay_in(good)
    assert drawn is not None and drawn.size == (demo_evidence.OVERLAY_SIZE,) * 2
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(served_overlay(live["target"], tile)))
    assert overlay_in(broken) is None and "INVALID_ARGUMENT" in broken


def test_backend_without_explain_hides_evidence_and_says_why(live: dict) -> None:
    legacy = demo.DemoBackend(live["target"], model_name=LEGACY)
    available, why = legacy.evidence()
    assert not available
    for part in ("model version 1", "no `explain` signature", "`serving_default`"):
        assert part in why
    page, _ = legacy.classify([str(live["tile"])], evidence=True)
    plain, _ = live["backend"].classify([str(live["tile"])])
    assert overlay_in(page) is None and "no `explain` signature" in page
    assert len(probabilities_in(page)) == 3 and probabilities_in(page) == probabilities_in(plain)
    legacy.client.close()


def served_overlay(target: str, path: Path) -> Image.Image:
    """The overlay drawn from a direct ``explain`` call, as the page should show it."""
    client = LungClient(target)
    (answer,) = client.explain([path])
    client.close()
    label = demo_evidence.overlay_label(answer.prediction)
    return overlay(path, answer.heatmap, label, size=demo_evidence.OVERLAY_SIZE)


def test_browser_evidence_toggle_shows_the_overlay(live: dict, browser, artifacts_dir: Path) -> None:
    open_page(browser, live["url"], artifacts_dir)
    toggle = wait_until(
        browser,
        ec.element_to_be_clickable((By.CSS_SELECTOR, "#lungtf-evidence input[type=checkbox]")),
        "the evidence toggle",
        artifacts_dir,
    )
    upload(browser, live["tile"])
    name = live["tile"].name
    expected = direct_probabilities(live["target"], live["tile"])[1]
    assert shown_probabilities(browser, name, artifacts_dir) == expected
    css = f'#lungtf-results [data-name="{name}"] img.lungtf-overlay'
    assert not browser.find_elements(By.CSS_SELECTOR, css)
    toggle.click()
    img = wait_until(
        browser, ec.visibility_of_element_located((By.CSS_SELECTOR, css)), "the overlay",
        artifacts_dir,
    )  # fmt: skip
    assert img.size["width"] >= 100 and img.location["x"] > browser.find_element(
        By.CSS_SELECTOR, f'#lungtf-results [data-name="{name}"] .lungtf-body'
    ).location["x"]  # beside the probabilities, to their right
    drawn = Image.open(io.BytesIO(base64.b64decode(img.get_attribute("src").split(",", 1)[1])))
    np.testing.assert_array_equal(
        np.asarray(drawn.convert("RGB")), np.asarray(served_overlay(live["target"], live["tile"]))
    )
    assert shown_probabilities(browser, name, artifacts_dir) == expected
    browser.save_screenshot(str(artifacts_dir / "demo_evidence.png"))


def test_browser_hides_the_toggle_without_explain(live: dict, browser, artifacts_dir: Path) -> None:
    backend = demo.DemoBackend(live["target"], model_name=LEGACY)
    app = demo.build_app(backend, live["examples"])
    url = demo.launch(app, "127.0.0.1", free_port(), live["examples"], block=False)
    try:
        open_page(browser, url, artifacts_dir)
        note = (By.ID, "lungtf-evidence-note")
        why = "Evidence overlays are unavailable"
        wait_until(browser, ec.text_to_be_present_in_element(note, why), why, artifacts_dir)
        text = " ".join(browser.find_element(*note).text.split())
        assert "model version 1 served at" in text and "has no explain signature" in text
        toggles = browser.find_elements(By.CSS_SELECTOR, "#lungtf-evidence")
        assert not any(t.is_displayed() for t in toggles)
        browser.save_screenshot(str(artifacts_dir / "demo_no_evidence.png"))
    finally:
        app.close()
        backend.client.close()


def test_browser_shows_server_down_naming_target(live: dict, browser, artifacts_dir: Path) -> None:
    live["proc"].terminate()
    live["proc"].wait(timeout=30)
    open_page(browser, live["url"], artifacts_dir)
    message = f"Cannot reach the model server at {live['target']}"
    alert = (By.CSS_SELECTOR, "#lungtf-results .lungtf-alert")
    browser.find_elements(By.CSS_SELECTOR, "#lungtf-examples img")[-1].click()
    wait_until(browser, ec.text_to_be_present_in_element(alert, message), message, artifacts_dir)
    assert message in browser.find_element(By.ID, "lungtf-footer").text
    unanswered = f"Not classified: {Path(live['examples'][-1][0]).name}."
    assert unanswered in browser.find_element(*alert).text
    browser.save_screenshot(str(artifacts_dir / "demo_server_down.png"))
    # the page stays usable: an upload after the error gets its own answer naming that file
    upload(browser, live["tile"])
    unanswered = f"Not classified: {live['tile'].name}."
    wait_until(
        browser, ec.text_to_be_present_in_element(alert, unanswered), unanswered, artifacts_dir
    )
