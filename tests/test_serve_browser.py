"""`mupad serve` end to end: the real uvicorn server on a tiny checkpoint, driven by headless
Chromium (Debian packages `chromium` + `chromium-driver`, through selenium and the system
chromedriver; nothing is downloaded). Skipped with the reason when they are absent.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is absent")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is absent")

from test_serve import TUMOR_TILE, tiny_checkpoint

from mupad.serve.app import create_app
from mupad.serve.cli import build_server
from mupad.serve.service import ServeLimits

BROWSERS = ("chromium", "chromium-browser")
WAIT_S = 60


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """http://127.0.0.1:<free port> of a real server on a text + image checkpoint."""
    root = tmp_path_factory.mktemp("serve_browser")
    checkpoint = tiny_checkpoint(root / "sit", text_dim=384, image_dim=2048)
    app = create_app(checkpoint, limits=ServeLimits(max_steps=250), out=root / "out", device="cpu")
    server = build_server(app, port=0, log_level="warning")  # port 0: the OS picks a free one
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1"  # the default bind
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through the system chromedriver."""
    binary = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(
            "headless Chromium not found (needs the Debian packages chromium and "
            "chromium-driver: apt-get install -y chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def test_the_page_generates_a_tile_that_appears_with_its_seed(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(server_url + "/")
    assert "mupad" in browser.title
    assert not browser.find_elements(By.ID, "rna-section")  # the checkpoint has no RNA stream

    # A bad upload shows the server's message on the page.
    (tmp_path / "notes.png").write_text("not an image")
    browser.find_element(By.ID, "image").send_keys(str(tmp_path / "notes.png"))
    browser.find_element(By.ID, "generate").click()
    error = wait.until(expected_conditions.visibility_of_element_located((By.ID, "error")))
    assert "cannot read reference image notes.png" in error.text

    # Caption + bundled tile, 3 steps, seed 7.
    Select(browser.find_element(By.ID, "tile")).select_by_value(TUMOR_TILE)  # clears the upload
    preview = browser.find_element(By.ID, "reference-preview")
    wait.until(lambda _: preview.get_property("naturalWidth") > 0)
    browser.find_element(By.ID, "text").send_keys("H&E histology: tumor")
    for name, value in (("steps", "3"), ("seed", "7")):
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    browser.find_element(By.ID, "generate").click()

    image = wait.until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "img.generated"))
    )
    wait.until(lambda _: image.get_property("complete") and image.get_property("naturalWidth"))
    assert image.get_property("naturalWidth") == 16
    assert browser.find_element(By.CSS_SELECTOR, "figure.result .seed").text == "7"
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert "conditions: image, text" in browser.find_element(By.ID, "status").text

    png, sidecar = browser.find_elements(By.CSS_SELECTOR, "figure.result a")
    assert png.get_attribute("download") == "mupad_seed7.png"
    with urllib.request.urlopen(sidecar.get_attribute("href"), timeout=WAIT_S) as response:
        record = json.load(response)
    assert record["seed"] == 7 and record["record"]["text"] == "H&E histology: tumor"
    assert Path(record["record"]["image"]).name == Path(TUMOR_TILE).name


def test_generation_runs_off_the_event_loop(server_url):
    """While a long generation runs, the server keeps answering other requests."""
    body = b"--b\r\n" + b"".join(
        f'Content-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n--b'.encode() + b"\r\n"
        for k, v in {"text": "x", "steps": "250", "num_images": "2"}.items()
    )
    body = body[: -len(b"\r\n")] + b"--\r\n"
    request = urllib.request.Request(
        server_url + "/api/generate", data=body, method="POST",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    done: dict[str, float] = {}

    def generate() -> None:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            assert response.status == 200
        done["generate"] = time.monotonic()

    worker = threading.Thread(target=generate)
    worker.start()
    time.sleep(0.1)  # the generation has started
    with urllib.request.urlopen(server_url + "/api/info", timeout=WAIT_S) as response:
        assert json.load(response)["streams"] == ["image", "text"]
    answered = time.monotonic()
    worker.join(timeout=WAIT_S)
    assert "generate" in done and answered < done["generate"]
