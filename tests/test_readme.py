"""The README's CPU blocks (the smoke run, the whole path with the tiny model) run as written, in order, in a
fresh copy of the repository: a block that stops working fails here, not in a newcomer's first hour."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

pytestmark = [pytest.mark.readme, pytest.mark.model]  # builds models; a minute and a half
PHOTOS_LINE = "# put a few photos in each"


def readme_blocks(text):
    """The ```bash blocks of the README (indented ones too, as in a numbered list), their lines unindented."""
    blocks = []
    for indent, body in re.findall(r"^( *)```bash\n(.*?)^ *```", text, flags=re.S | re.M):
        blocks.append("\n".join(line[len(indent):] for line in body.splitlines()))
    return blocks


def cpu_blocks():
    """The blocks that build the tiny random model: the ones a machine without a GPU or network can run."""
    return [b for b in readme_blocks((ROOT / "README.md").read_text()) if "tests/tiny_model.py" in b]


def fresh_copy(target):
    """The repository's files in `target`: those git tracks or would track (not ignored), as a clone of the work
    tree committed would hold them; without git, the tree minus its outputs."""
    if (ROOT / ".git").exists():
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout
        for name in files.decode().split("\0"):
            if name and (ROOT / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
    else:
        shutil.copytree(ROOT, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "__pycache__", "tiny_sd*", "*results", "Data", "My_residuals", "runs"))
    return target


def run_bash(script, cwd):
    """The lines as one bash script that stops at the first failing command, with the test's Python first on
    PATH and none of the scripts' settings inherited from the environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_NAME", "CONFIG_DIR", "OUTPUT_DIR", "DATA_DIR", "CONCEPTS_FILE", "FORCE", "PYTHON")}
    env.update(PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1",
               NUM_GPUS="0", PYTHONWARNINGS="ignore")
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README block failed:\n{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def put_photos(folder, count=3):
    """A few photos in each of the block's folders, as the README asks (random pixels: the model is random too)."""
    rng = np.random.default_rng(0)
    for concept in sorted(folder.iterdir()):
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(concept / f"{i:02d}.jpg")


def runs_in(folder):
    """{run folder relative to `folder`: sorted image names} for every config.json inference.py wrote there."""
    return {str(c.parent.relative_to(folder)): sorted(p.name for p in c.parent.glob("*.png") if p.name[0].isdigit())
            for c in folder.rglob("config.json")}


def test_the_readme_cpu_blocks_run_in_order_as_written(tmp_path):
    smoke, whole = blocks = cpu_blocks()
    assert len(blocks) == 2 and PHOTOS_LINE in whole, "the README's CPU blocks changed: update this test"
    repo = fresh_copy(tmp_path / "repo")

    out = run_bash(smoke, repo)
    smoke_runs = runs_in(repo / "smoke_results")
    assert len(smoke_runs) == 4 and all(images == ["0.png", "1.png"] for images in smoke_runs.values()), smoke_runs
    assert "done: 4 configs, results in smoke_results" in out

    before, _, after = whole.partition(PHOTOS_LINE)
    run_bash(before, repo)
    put_photos(repo / "Data" / "concept_image")
    out = run_bash(after, repo)
    assert sorted(p.parent.name for p in (repo / "My_residuals").glob("*/residual.safetensors")) == \
        ["cat2", "dog", "dog6", "vase"]
    assert "trained: cat2 dog dog6 vase; skipped: none" in out
    tiny_runs = runs_in(repo / "tiny_results")
    assert sorted(run.split("/")[0] for run in tiny_runs) == ["cat2_dog6", "dog_vase"]  # configs/trained's two
    assert all(images == ["0.png", "1.png"] for images in tiny_runs.values())
    assert not (repo / "inference_results").exists()  # each section writes its own folder
