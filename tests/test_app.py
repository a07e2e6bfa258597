"""app.py on the tiny model: driven in headless Chromium (boxes dragged on the canvas) and through gradio_client;
its images equal inference.py's for the config it saves."""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from test_inference import run, write_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
browser = pytest.mark.skipif(not HAVE_BROWSER and not os.environ.get("CI"),
                             reason=f"no {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver); "
                                    f"CI installs them")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    """(url, folder): app.py serving the tiny model, with the two residuals of write_config in folder/cfg."""
    folder = tmp_path_factory.mktemp("app")
    write_config(folder / "cfg")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--pretrained_model_name_or_path", str(tiny_model), "--residuals",
         str(folder / "cfg"), "--configs", str(folder / "cfg"), "--save_dir", str(folder / "saved"), "--port",
         str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"app.py did not start: {process.stdout.read()}")
    yield url, folder
    process.terminate()
    process.wait(10)


def inference_image(tiny_model, config, out, seed=0):
    """inference.py's image `seed` of a config at 64 x 64."""
    data = json.loads(config.read_text())
    steps = (data[0] if isinstance(data, list) else data)["num_inference_steps"]
    folder = run(tiny_model, config, out, "--height", "64", "--width", "64", "--seed", str(seed),
                 "--num_inference_steps", str(steps))
    return np.asarray(Image.open(folder / f"{seed}.png"))


def test_generate_endpoint_equals_inference(app, tiny_model, tmp_path):
    from gradio_client import Client, handle_file

    url, folder = app
    cfg = folder / "cfg"  # the page's relative paths are looked up in app.py's working folder: absolute ones here
    config = write_config(cfg, num_inference_steps=2,
                          residual_dict={f"<{n}>": str(cfg / f"{n}.safetensors") for n in ("cat", "dog")})
    files = Client(url, verbose=False).predict(config.read_text(), handle_file(str(folder / "cfg" / "layout.png")),
                                              3, 2, api_name="/generate")
    assert len(files) == 2
    for seed, file in zip((3, 4), files):
        assert Image.open(file).format == "PNG"
        expected = inference_image(tiny_model, config, tmp_path / f"o{seed}", seed)
        assert np.array_equal(np.asarray(Image.open(file)), expected)
    data = json.loads(config.read_text())[0]
    del data["layout"], data["color_context"]
    data["regions"] = [{"phrase": "cat", "box": [0, 0, 2, 1]}]
    with pytest.raises(Exception, match=r"config: regions\[0\]: box: \[0, 0, 2, 1\] reaches outside the image"):
        Client(url, verbose=False).predict(json.dumps(data), None, 0, 1, api_name="/generate")


@browser
def test_boxes_dragged_in_the_browser_give_inference_images(app, tiny_model, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, folder = app
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    wait = WebDriverWait(driver, 30)
    try:
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#canvas img"))

        def type_into(selector, text, enter=True):
            field = driver.find_element(By.CSS_SELECTOR, selector)
            field.click()
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(text + (Keys.ENTER if enter else ""))

        def status():
            return driver.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value")

        type_into("#prompt textarea", "A cat on the right and a dog on the left.", enter=False)
        for name in ("cat", "dog"):
            type_into("#residuals input", str(folder / "cfg" / f"{name}.safetensors"))
        type_into("#steps input[type=number]", "2")
        where = "#positions textarea"
        wait.until(lambda d: "<dog> -> position 8 'dog'" in d.find_element(By.CSS_SELECTOR, where).get_attribute("value"))

        canvas = driver.find_element(By.CSS_SELECTOR, "#canvas img")
        for phrase, (x0, y0, x1, y1) in (("<dog>", (0.05, 0.1, 0.5, 0.9)), ("<cat>", (0.55, 0.2, 0.95, 0.8))):
            type_into("#phrase input", phrase)
            before = canvas.get_attribute("src")
            rect = canvas.rect
            ActionChains(driver).move_to_element_with_offset(canvas, (x0 - 0.5) * rect["width"],
                                                             (y0 - 0.5) * rect["height"]).click_and_hold() \
                .move_by_offset((x1 - x0) * rect["width"], (y1 - y0) * rect["height"]).release().perform()
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#canvas img").get_attribute("src") != before)
            canvas = driver.find_element(By.CSS_SELECTOR, "#canvas img")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: status().startswith(("generated", "error")))
        assert status().startswith("generated 1 image"), status()
        src = driver.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
        shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src).read())).convert("RGB"))
        src = driver.find_element(By.CSS_SELECTOR, "#attention img").get_attribute("src")
        maps = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src).read())).convert("RGB"))
        assert maps.shape[1] > 2 * shown.shape[1]  # the image, then one map per subject beside it
        assert np.array_equal(maps[:shown.shape[0], :shown.shape[1]], shown)
        driver.find_element(By.CSS_SELECTOR, "#save").click()
        wait.until(lambda d: status().startswith(("saved", "error")))
        assert status().startswith("saved"), status()
        driver.save_screenshot(str(tmp_path / "editor.png"))
    finally:
        driver.quit()
    config = folder / "saved" / "my_layout.json"
    saved = json.loads(config.read_text())
    assert saved["color_context"] == {"255,0,0": ["<dog>", 2.5], "0,255,0": ["<cat>", 2.5]}
    layout = np.asarray(Image.open(folder / "saved" / "my_layout_layout.png"))
    assert (layout[32, 10] == (255, 0, 0)).all() and (layout[32, 50] == (0, 255, 0)).all()
    assert (layout[1, 1] == 0).all()
    assert np.array_equal(shown, inference_image(tiny_model, config, tmp_path / "out"))
    if os.environ.get("EDITOR_SCREENSHOT"):  # README's picture: EDITOR_SCREENSHOT=docs/editor.png
        shutil.copy(tmp_path / "editor.png", os.environ["EDITOR_SCREENSHOT"])


@pytest.mark.parametrize("index", range(4))
def test_seed_configs_load_as_they_are(index):
    import app as editor_app

    path = ROOT / "configs" / f"guidance_config_prompt{index}.json"
    state, data = editor_app.load_state(path, 64, 64)
    seed = json.loads(path.read_text())[0]
    assert state["color_context"] == seed["color_context"] and data["prompt"] == seed["prompt"]
    for colour in seed["color_context"]:  # every region is on the canvas
        assert (state["layout"] == editor_app.colour_rgb(colour)).all(-1).any()
    config = editor_app.page_config(state, data["prompt"], list(data["residual_dict"].values()),
                                    seed["guidance_steps"], seed["guidance_weight"], 7.5, 50)
    assert sorted(config["subject_list"]) == sorted(seed["subject_list"])
    assert config["residual_dict"].keys() == seed["residual_dict"].keys()
