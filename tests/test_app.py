"""app.py on the tiny model: driven in headless Chromium (boxes dragged on the canvas) and through gradio_client;
its images equal inference.py's for the config it saves."""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import job_settings
from config_keys import PRESETS
from conftest import ROOT
from residual_utils import save_residual
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


@contextmanager
def serving(argv, log_file):
    """The url of app.py started with `argv` (its output in log_file), stopped after the block."""
    port = free_port()
    with open(log_file, "w") as log:  # a file, not a pipe: a pipe nobody reads would block the server
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *argv, "--port", str(port)], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.time() + 120
            while time.time() < deadline and process.poll() is None:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            else:
                pytest.fail(f"app.py did not start: {Path(log_file).read_text()}")
            yield url
        finally:
            process.terminate()
            process.wait(10)


def test_a_stopped_server_leaves_no_request_folder(tiny_model, tmp_path):
    """SIGTERM (a kill, a service manager, the tests) still removes the server's folder of request files."""
    from gradio_client import Client, handle_file

    config = write_config(tmp_path / "cfg", num_inference_steps=1)
    before = set(Path(tempfile.gettempdir()).glob("cones2-editor-*"))
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--residuals", str(tmp_path / "cfg")]
    with serving(argv, tmp_path / "server.log") as url:
        Client(url, verbose=False).predict(config.read_text(), handle_file(str(tmp_path / "cfg" / "layout.png")), 0,
                                           1, api_name="/generate")
        made = set(Path(tempfile.gettempdir()).glob("cones2-editor-*")) - before
        assert len(made) == 1 and list(next(iter(made)).glob("request-*/0.png"))
    assert not next(iter(made)).exists()


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    """(url, folder): app.py serving the tiny model, with the two residuals of write_config in folder/cfg."""
    folder = tmp_path_factory.mktemp("app")
    write_config(folder / "cfg")
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--residuals", str(folder / "cfg"), "--configs",
            str(folder / "cfg"), "--save_dir", str(folder / "saved")]
    with serving(argv, folder / "server.log") as url:
        yield url, folder


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
    cfg = folder / "cfg"  # residuals are found by file name among the offered: any folder part is left aside
    config = write_config(cfg, num_inference_steps=2)
    sent = json.loads(config.read_text())
    sent[0]["residual_dict"] = {f"<{n}>": f"elsewhere/{n}.safetensors" for n in ("cat", "dog")}
    files = Client(url, verbose=False).predict(json.dumps(sent), handle_file(str(folder / "cfg" / "layout.png")),
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
        for name in ("cat", "dog"):  # offered by --residuals: named by file name
            type_into("#residuals input", f"{name}.safetensors")
        type_into("#steps input[type=number]", "2")
        driver.find_element(By.CSS_SELECTOR, "#further .label-wrap").click()  # open the further settings
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#key_preset input").is_displayed())
        type_into("#key_preset input", "separated")  # the one switch sets the keys it stands for
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#key_residual_guidance input").get_attribute("value")
                   == "3")
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
        scale = maps.shape[0] // shown.shape[0]  # small images are enlarged, each pixel a square, for the labels
        assert maps.shape[1] == 3 * scale * shown.shape[1]  # the image, then one map per subject beside it
        assert np.array_equal(maps[:scale * shown.shape[0]:scale, :scale * shown.shape[1]:scale], shown)
        driver.find_element(By.CSS_SELECTOR, "#save").click()
        wait.until(lambda d: status().startswith(("saved", "error")))
        assert status().startswith("saved"), status()
        driver.save_screenshot(str(tmp_path / "editor.png"))
    finally:
        driver.quit()
    config = folder / "saved" / "my_layout.json"
    saved = json.loads(config.read_text())
    assert saved["color_context"] == {"255,0,0": ["<dog>", 2.5], "0,255,0": ["<cat>", 2.5]}
    assert saved["preset"] == "separated" and not set(PRESETS["separated"]) & set(saved)  # the preset stands for them
    assert {k: job_settings(saved)[k] for k in PRESETS["separated"]} == PRESETS["separated"]
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


def api_error(client, config, layout=None, seed=0, count=1, **extra):
    """The one-line message the generate endpoint answers a bad request with (it must fail)."""
    with pytest.raises(Exception) as info:
        client.predict(config if isinstance(config, str) else json.dumps(config), layout, seed, count,
                       api_name="/generate", **extra)
    message = str(info.value)
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


def test_a_caller_reaches_only_what_the_server_offers(app, tmp_path):
    """Hostile requests through gradio_client: no server file is opened or told about, every request is
    bounded, the JSON is read strictly; the server's log holds no traceback for any of them."""
    from gradio_client import Client, handle_file

    url, folder = app
    client = Client(url, verbose=False)
    config = json.loads(write_config(folder / "cfg", num_inference_steps=1).read_text())[0]
    layout = handle_file(str(folder / "cfg" / "layout.png"))
    secret = folder / "secret"
    secret.mkdir(exist_ok=True)
    shutil.copy(folder / "cfg" / "cat.safetensors", secret / "x.safetensors")
    (secret / "bad.safetensors").write_text("not a residual")
    unknown = []
    for value in ("../secret/x.safetensors", str(secret / "x.safetensors"), "/etc/passwd", str(secret / "bad.safetensors"),
                  "/nonexistent/y.safetensors"):
        message = api_error(client, {**config, "residual_dict": {"<cat>": value, "<dog>": "dog.safetensors"}}, layout)
        assert "is not a residual this server offers (cat.safetensors, dog.safetensors)" in message, message
        unknown.append(message.replace(value[:80], "VALUE"))
    assert len(set(unknown)) == 1  # absent, unreadable and of the wrong kind read the same
    message = api_error(client, {**config, "layout": str(folder / "cfg" / "layout.png")})
    assert "layout: " in message and "is not a layout this server offers (none)" in message
    for message in unknown + [message]:
        assert str(ROOT) not in message.replace(str(folder), "") and "cones2-editor" not in message
    # a residual sent with the request is named by its file name; a broken one is named so, and only so
    (tmp_path / "mine.safetensors").write_text("not a residual")
    message = api_error(client, {**config, "residual_dict": {"<cat>": "mine.safetensors", "<dog>": "dog.safetensors"}},
                        layout, residual_files=[handle_file(str(tmp_path / "mine.safetensors"))])
    assert message.startswith("config: residual_dict.<cat>: mine.safetensors: not a residual file"), message
    assert "/" not in message.split(": ", 1)[1]
    # bounds
    assert "num_images: expected an integer from 1 to 8, got 1000000" in api_error(client, config, layout, 0, 1000000)
    assert "seed: expected an integer from 0 to 4294967295" in api_error(client, config, layout, 2 ** 64, 1)
    assert "--max_steps 100" in api_error(client, {**config, "num_inference_steps": 1000}, layout)
    for size, expected in (((1, 1), "1x1 pixels"), ((100, 60), "100x60 pixels; images are made at the layout's size, "
                                                                "whose sides must be multiples of 8 (e.g. 96x56)"),
                           ((1032, 8), "1032x8, larger than this server's --max_side 1024")):
        Image.new("RGB", size, (255, 0, 0)).save(tmp_path / "small.png")
        assert expected in api_error(client, config, handle_file(str(tmp_path / "small.png")))
    boxes = {k: v for k, v in config.items() if k not in ("layout", "color_context")}
    boxes["regions"] = [{"phrase": "dog", "box": [0, 0, 0.5, 1]}, {"phrase": "cat", "box": [0.5, 0, 1, 1]}]
    assert "height 8200" not in api_error(client, boxes, height_value=8200, width_value=64)
    assert "a boxes config is rendered from its boxes; send no layout image" in api_error(client, boxes, layout)
    [image] = client.predict(json.dumps(boxes), None, 0, 1, api_name="/generate", height_value=32, width_value=48)
    assert Image.open(image).size == (48, 32)
    # strict JSON, as inference.py reads a file
    assert api_error(client, '"42"', layout) == "config: expected a JSON object (or a list holding one)"
    assert "nested deeper than 64 levels" in api_error(client, "[" * 100_000 + "]" * 100_000, layout)
    assert "key 'prompt' appears twice" in api_error(client, json.dumps(config)[:-1] + ', "prompt": "x"}', layout)
    assert "Traceback" not in (folder / "server.log").read_text()


def test_concurrent_requests_get_their_own_images(app, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    url, folder = app
    config = write_config(folder / "cfg", num_inference_steps=2).read_text()
    layout = handle_file(str(folder / "cfg" / "layout.png"))

    def images(seed):
        files = Client(url, verbose=False).predict(config, layout, seed, 1, api_name="/generate")
        return np.asarray(Image.open(files[0]))

    alone = [images(seed) for seed in (5, 6)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(images, (5, 6, 5, 6)))
    for i, image in enumerate(together):
        assert np.array_equal(image, alone[i % 2])
    assert not np.array_equal(alone[0], alone[1])


def test_request_folders_are_cleaned_and_the_server_needs_a_login_beyond_loopback(tiny_model, tmp_path):
    import app as editor_app
    from test_inference import write_residual

    write_config(tmp_path / "cfg", num_inference_steps=1)
    residuals = editor_app.offered_files([tmp_path / "cfg"], editor_app.RESIDUAL_SUFFIXES, "residuals")
    editor = editor_app.Editor(str(tiny_model), "cpu", "fp32", residuals)
    config = (tmp_path / "cfg" / "config.json").read_text()
    for seed in range(editor_app.KEPT_REQUESTS + 3):
        editor.generate(config, tmp_path / "cfg" / "layout.png", seed, 1)
    assert len(list(editor.out_dir.iterdir())) == editor_app.KEPT_REQUESTS
    other = tmp_path / "other"
    other.mkdir()
    write_residual(other / "cat.safetensors", 32, "cat")
    with pytest.raises(editor_app.UserError, match="two files named cat.safetensors"):
        editor_app.offered_files([tmp_path / "cfg", other], editor_app.RESIDUAL_SUFFIXES, "residuals")

    def settings(*argv):
        return editor_app.check_args(editor_app.parse_args(["--pretrained_model_name_or_path", "m", *argv]))

    with pytest.raises(editor_app.UserError, match="--host 0.0.0.0: serving beyond this machine needs --auth"):
        settings("--host", "0.0.0.0")
    assert settings("--host", "0.0.0.0", "--auth", "ana:secret")[0] == [("ana", "secret")]
    assert settings("--host", "0.0.0.0", "--open")[0] == []
    with pytest.raises(editor_app.UserError, match="--auth ana:...: expected USER:PASSWORD"):
        settings("--auth", "ana:")
    with pytest.raises(editor_app.UserError, match="--max_side 1001: expected a multiple of 8"):
        settings("--max_side", "1001")


def test_the_readme_api_example_runs_as_written(tiny_model_1024, tmp_path):
    """README's generate example, as written, against app.py serving the seed's residuals from the repository's
    folder: the config's residuals and layout are found (only --max_steps 1, to keep the test short, stops it
    before sampling: 768 px on the CPU takes minutes)."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("Scripts use the `generate` endpoint"):]
    code = textwrap.dedent(block[block.index("```python") + len("```python"):block.index("```", block.index("```python") + 9)])
    command = readme[readme.index("3. **The editor in the browser**"):]
    command = command[command.index("python app.py"):command.index("\n", command.index("python app.py"))].split()
    assert command[:2] == ["python", "app.py"] and "--residuals" in command
    argv = [*command[2:], "--max_steps", "1"]
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tiny_model_1024)
    with serving(argv, tmp_path / "server.log") as url:
        cwd = os.getcwd()
        os.chdir(ROOT)  # "from the repository's folder"
        try:
            with pytest.raises(Exception, match="num_inference_steps: 50, more than this server's --max_steps 1"):
                exec(code.replace("http://127.0.0.1:7860/", url), {})
        finally:
            os.chdir(cwd)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_what_the_probe_found_stays_fixed(app, tmp_path):
    """Messages of the page's Load and of a broken layout name no server folder; a residual sent must be named as
    one; a fractional seed and a null config are refused; the request folders are served to nobody; two sessions'
    uploads of one name are saved as two files."""
    from gradio_client import Client, handle_file

    url, folder = app
    client = Client(url, verbose=False)
    config = json.loads(write_config(folder / "cfg", num_inference_steps=1).read_text())[0]
    layout = handle_file(str(folder / "cfg" / "layout.png"))
    (tmp_path / "cut.png").write_bytes((folder / "cfg" / "layout.png").read_bytes()[:60])
    message = api_error(client, config, handle_file(str(tmp_path / "cut.png")))
    assert message.startswith("the layout sent: not a readable image"), message
    (tmp_path / "layout.png").write_bytes((folder / "cfg" / "cat.safetensors").read_bytes())
    assert "residual_files: 'layout.png': a residual file is named" in api_error(
        client, config, layout, residual_files=[handle_file(str(tmp_path / "layout.png"))])
    assert "seed: expected an integer" in api_error(client, config, layout, 1.5, 1)
    assert api_error(client, "null", layout) == "config: expected a JSON object (or a list holding one)"
    [image] = client.predict(json.dumps(config), layout, 0, 1, api_name="/generate")
    copies = sorted(Path(tempfile.gettempdir()).glob("cones2-editor-*/request-*/cat.safetensors"))
    assert copies  # the request folder's copy of a residual is served to nobody; the image, from gradio's cache
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(f"{url}gradio_api/file={copies[-1]}")
    assert urllib.request.urlopen(f"{url}gradio_api/file={image}").status == 200
    # Load of a broken config the server offers: named by its name, no folder of the server's
    bad = folder / "cfg" / "config.json"
    try:
        for broken in ({**config, "guidance_wieght": 1}, {**config, "residual_dict": {"<cat>": "/etc/hostname"}},
                       {**config, "residual_dict": {"<cat>": "/nowhere/absent.safetensors"}}):
            bad.write_text(json.dumps(broken))  # absent, not a residual, or a bad key: one answer, no path
            result = client.predict("config.json", 64, 64, api_name="/on_load")
            status = next(v for v in result if isinstance(v, str) and v.startswith("error"))
            assert status == "error: config.json cannot be loaded (the server's log says why)", status
        assert "/nowhere/absent.safetensors: file not found" in (folder / "server.log").read_text() or \
            "absent.safetensors" in (folder / "server.log").read_text()  # the owner reads why
    finally:
        write_config(folder / "cfg", num_inference_steps=1)
    # the page's own endpoints: a config inference.py would refuse is not saved, a non-residual not taken,
    # the typed box and phrase are bounded
    import app as editor_app

    further = [1e39 if key.name == "residual_scale" else key.default for key in editor_app.FURTHER_KEYS]
    defaults = [key.default for key in editor_app.FURTHER_KEYS]
    status = client.predict("huge", config["prompt"], ["cat.safetensors", "dog.safetensors"], 50, 0.08, 7.5, 2,
                            *further, api_name="/on_save")
    assert "residual_scale: expected a finite number" in status, status
    assert not (folder / "saved" / "huge.json").exists()
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(1000))
    client.predict("config.json", 64, 64, api_name="/on_load")  # its subjects' positions: 2 and 8
    status = client.predict("misplaced", "A <cat> on the right and a <dog> on the left",
                            ["cat.safetensors", "dog.safetensors"], 50, 0.08, 7.5, 2, *defaults, api_name="/on_save")
    assert status.startswith("error: config: subject_list:") and not (folder / "saved" / "misplaced.json").exists()
    result = client.predict("config.json", 64.5, 64, api_name="/on_load")  # the caller's size, told as such
    assert any(isinstance(v, str) and v.startswith("error: height: expected an integer") for v in result), result
    result = client.predict([handle_file(str(tmp_path / "junk.safetensors"))], [], api_name="/on_upload")
    assert any(isinstance(v, str) and v.startswith("error: junk.safetensors: not a") for v in result), result
    result = client.predict("x" * 5000, "0, 0, 1, 1", "a cat", [], 50, 0.08, 7.5, 2, *defaults, api_name="/on_add")
    assert any(isinstance(v, str) and v == "error: the phrase and the box: at most 1000 characters each"
               for v in result), result
    # two sessions upload different residuals of one name and save: two files, each config names its own
    saved = []
    for session, value in enumerate((1.0, -1.0)):
        own = tmp_path / f"s{session}" / "z.safetensors"
        save_residual(own, torch.full((1, 32), value), {"class_phrase": "dog", "base_model": "tiny"})
        session_client = Client(url, verbose=False)
        session_client.predict([handle_file(str(own))], [], api_name="/on_upload")
        controls = (config["prompt"], ["z.safetensors", "cat.safetensors"], 50, 0.08, 7.5, 2, *defaults)
        session_client.predict("<z>", "0, 0, 0.5, 1", *controls, api_name="/on_add")
        status = session_client.predict(f"saved{session}", *controls, api_name="/on_save")
        assert status.startswith(f"saved saved{session}.json"), status
        record = json.loads((folder / "saved" / f"saved{session}.json").read_text())
        saved.append(folder / "saved" / record["residual_dict"]["<z>"])
        assert saved[-1].read_bytes() == own.read_bytes()
    assert saved[0] != saved[1]


def test_the_further_settings_are_the_tables_optional_keys():
    import app as editor_app
    from config_keys import KEYS

    assert [key.name for key in editor_app.FURTHER_KEYS] == [key.name for key in KEYS
                                                            if key.editor and key.name != "cfg_scale"]
    values = [{"region_self_attention": True, "residual_guidance": 3.0}.get(key.name, key.default)
              for key in editor_app.FURTHER_KEYS]
    config = editor_app.page_config(editor_app.new_state(64, 64), "a dog", [], 50, 0.08, 7.5, 50, *values)
    assert config["region_self_attention"] is True and config["residual_guidance"] == 3.0
    assert not {"text_length", "guidance_schedule", "negative_prompt"} & set(config)  # defaults are left out


def test_the_preset_control_shows_the_keys_it_sets():
    import app as editor_app
    from config_keys import KEY, PRESETS

    separated = dict(zip(editor_app.PRESET_KEYS, editor_app.preset_values("separated")))
    assert separated == PRESETS["separated"]
    faithful = dict(zip(editor_app.PRESET_KEYS, editor_app.preset_values("faithful")))
    assert faithful == {name: KEY[name].default for name in PRESETS["separated"]}
    assert all(KEY[name].editor for name in editor_app.PRESET_KEYS)


def test_a_key_set_back_to_its_default_under_a_preset_is_written_and_a_loaded_config_shows_what_it_runs():
    import app as editor_app

    names = [key.name for key in editor_app.FURTHER_KEYS]

    def page(**values):
        further = [values.get(key.name, key.default) for key in editor_app.FURTHER_KEYS]
        return editor_app.page_config(editor_app.new_state(64, 64), "a dog", [], 50, 0.08, 7.5, 50, *further)

    # under "separated", residual guidance turned off by hand must reach the config, or the preset's 3.0 would run
    config = page(preset="separated", residual_guidance=0.0, region_self_attention=True,
                  residual_guidance_in_region=True)
    assert config["residual_guidance"] == 0.0 and "region_self_attention" not in config
    settings = job_settings(config)
    assert settings["residual_guidance"] == 0.0 and settings["region_self_attention"] is True
    # loading: a config's own key wins over its preset's, the preset's over the table's
    shown = dict(zip(names, editor_app.loaded_values({"preset": "separated", "residual_guidance": 1.5})))
    assert shown["residual_guidance"] == 1.5 and shown["residual_guidance_in_region"] is True
    assert shown["region_self_attention"] is True and shown["text_length"] == job_settings({})["text_length"]
    assert dict(zip(names, editor_app.loaded_values({})))["residual_guidance"] == 0.0


def test_integers_and_texts_from_callers_are_bounded():
    import app as editor_app

    for value in (float("inf"), float("-inf"), float("nan"), 1.5, "3", None, True, 2 ** 70):
        with pytest.raises(editor_app.UserError, match="seed: expected an integer from 0 to 9"):
            editor_app.checked_integer(value, "seed", 0, 9)
    assert editor_app.checked_integer(4.0, "seed", 0, 9) == 4


def test_the_editor_serves_a_flux_model(tiny_flux, tmp_path):
    """The editor's sampling on a FLUX model: the images are inference.py's for the same config and seed, the
    further settings show flux_guidance and true CFG and hide what FLUX has no use for, and sizes go by 16."""
    import app as editor_app
    import inference
    from residual_utils import save_residual

    for name in ("dog", "cat"):
        save_residual(tmp_path / f"{name}.safetensors", 0.1 * torch.randn(1, 32),
                      {"class_phrase": name, "base_model": "tiny", "family": "flux"})
    layout = np.zeros((64, 64, 3), np.uint8)
    layout[:, :32], layout[:, 32:] = (255, 0, 0), (0, 255, 0)
    Image.fromarray(layout).save(tmp_path / "layout.png")
    config = {"prompt": "a photo of a dog and a cat", "residual_dict": {"<dog>": "dog.safetensors",
                                                                       "<cat>": "cat.safetensors"},
              "color_context": {"255,0,0": ["<dog>", 2.5], "0,255,0": ["<cat>", 2.5]}, "layout": "layout.png",
              "guidance_steps": 2, "guidance_weight": 0.08, "weight_negative": -1e8,
              "subject_list": ["<dog>", "<cat>"], "num_inference_steps": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    residuals = editor_app.offered_files([tmp_path], editor_app.RESIDUAL_SUFFIXES, "residuals")
    editor = editor_app.Editor(str(tiny_flux), "cpu", "fp32", residuals)
    [png] = editor.generate(json.dumps(config), tmp_path / "layout.png", 3, 1)
    [folder] = inference.main(inference.parse_args([
        "--pretrained_model_name_or_path", str(tiny_flux), "--inference_config", str(tmp_path / "config.json"),
        "--output_dir", str(tmp_path / "out"), "--num_images", "1", "--seed", "3", "--resolution", "64"]))
    assert np.array_equal(np.array(Image.open(png)), np.array(Image.open(folder / "3.png")))
    with pytest.raises(editor_app.UserError, match="expected a multiple of 16 from 16"):
        editor.check_size(72, 64, "the canvas")
    shown = {key.name for key in editor_app.FURTHER_KEYS if editor.family in key.families}
    assert {"flux_guidance", "true_cfg_scale", "negative_prompt"} <= shown and not shown & {"cfg_scale", "cfg_schedule"}
