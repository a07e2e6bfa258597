"""The run record: the config.json inference.py writes beside a run's images, written and read here only.

A record holds `record_version`, the job's settings (every config key after defaults, resolved: absolute paths,
positions, the token rows of each colour, and the sha256 of every file the images depend on), the run's
settings (Run: model, size, seeds, batch size, dtype, compile, processes, device, library versions) and the
seeds. `inference.py --rerun` reads it back whole (read_record); evaluate.py reads what it scores with
(read_scoring_record). A value edited into a type or range the writer never writes is one UserError naming
the record and the key; a record without `record_version` was written before it was versioned (version 1 is
the same format).
"""
import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cli_utils import MAX_IMAGE_SIDE, MAX_SEED, UserError, is_finite32
from config import PAINTED_KEYS, parse_colour
from config_keys import KEYS
from file_utils import file_sha256, read_json, read_rgb, write_json
from layouts import read_regions, render_regions
from pipeline_utils import COMPILE_MODES, DTYPES

RECORD_VERSION = 1
MAX_IMAGES = 100_000  # images per config
CONFIG_KEYS = tuple(key.name for key in KEYS)
SCORING_KEYS = ("layout", "color_context", "token_rows", "subject_list", "file_sha256")  # the region scores'


@dataclasses.dataclass(frozen=True)
class Run:
    """How a run sampled its job, beside the job's settings in the record."""
    model: str  # as another run can find it again: a local folder as an absolute path, a hub id as it is
    height: int
    width: int
    seed: int  # image j has seed + j
    num_images: int
    batch_size: int
    compile: str | None
    dtype: str  # torch's name: float32, float16, bfloat16
    processes: int = 1
    device: str = "cpu"
    prediction_type: str = "epsilon"
    versions: dict = None  # cli_utils.library_versions()


class RecordedRun(NamedTuple):
    """What --rerun takes from a record: the settings every image depends on (dtype as its option name)."""
    model: str
    height: int
    width: int
    seed: int
    num_images: int
    batch_size: int
    compile: str | None
    dtype: str


def write_record(path, settings, run, seeds, layout=None):
    """config.json of a run: the job's settings, the Run, the seeds; layout: (file, sha256) of a boxes run's
    rendered layout (a painted layout is in the settings already)."""
    record = {"record_version": RECORD_VERSION, **settings, **dataclasses.asdict(run), "seeds": list(seeds)}
    if layout is not None:
        record["layout"] = str(layout[0])
        record["file_sha256"] = {**settings["file_sha256"], "layout": layout[1]}
    write_json(path, record)


def _read(path, required):
    record = read_json(path, "run record")
    missing = [key for key in required if not isinstance(record, dict) or key not in record]
    if missing:
        raise UserError(f"{path}: not a run record written by inference.py (missing {', '.join(missing)})")
    version = record.get("record_version", RECORD_VERSION)
    if version != RECORD_VERSION:
        raise UserError(f"{path}: record_version {str(version)[:20]}: this inference.py reads version "
                        f"{RECORD_VERSION} (was it written by a newer one?)")
    return record


def read_record(path):
    """(config, RecordedRun) of a record, for --rerun.

    The config is the record's resolved config (absolute paths, positions filled in); the files it names must
    hold what they held during the run (their sha256 is recorded), and a boxes config must still render to the
    layout the run recorded.
    """
    run_keys = [field for field in RecordedRun._fields] + ["file_sha256"]
    record = _read(path, run_keys + [key.name for key in KEYS if key.required])
    dtypes = {str(dtype).replace("torch.", ""): name for name, dtype in DTYPES.items()}

    def integer(key, low, high, step=1):
        value = record[key]
        return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high and value % step == 0

    checks = {"model": isinstance(record["model"], str) and bool(record["model"]), "dtype": record["dtype"] in dtypes,
              "compile": record["compile"] in (None, *COMPILE_MODES),
              "file_sha256": isinstance(record["file_sha256"], dict),
              "residual_dict": isinstance(record["residual_dict"], dict),
              "height": integer("height", 8, MAX_IMAGE_SIDE, 8), "width": integer("width", 8, MAX_IMAGE_SIDE, 8),
              "num_images": integer("num_images", 1, MAX_IMAGES), "batch_size": integer("batch_size", 1, MAX_IMAGES),
              "seed": integer("seed", 0, MAX_SEED)}
    for key, ok in checks.items():
        if not ok:
            raise UserError(f"{path}: {key}: unexpected value {record[key]!r} (was the record edited?)")
    run = RecordedRun(**{**{field: record[field] for field in RecordedRun._fields},
                         "dtype": dtypes[record["dtype"]]})
    config = {key: record[key] for key in CONFIG_KEYS if key in record}
    if "regions" in config:  # boxes: rendered again; the layout and color_context beside them are what they gave
        config = {key: value for key, value in config.items() if key not in PAINTED_KEYS}
    files = {"layout": record["layout"],
             **{f"residual_dict.{name}": file for name, file in config["residual_dict"].items()}}
    unchecked = sorted(set(files) - set(record["file_sha256"]))
    if unchecked:  # every file the images depend on is checked, or the rerun could silently differ
        raise UserError(f"{path}: file_sha256: no sha256 for {', '.join(unchecked)} (was the record edited?)")
    for key, digest in record["file_sha256"].items():
        file = Path(str(files.get(key, "")))
        if not file.is_file():
            raise UserError(f"{path}: {key}: file not found: '{file}'")
        if file_sha256(file) != digest:
            raise UserError(f"{path}: {key}: {file} has changed since the run (its sha256 differs)")
    if "regions" in config:  # the boxes must still give the layout the run recorded, as its files must be unchanged
        def fail(key, message):
            raise UserError(f"{path}: {key}: {message} (was the record edited?)")
        rendered = render_regions(read_regions(config["regions"], fail), run.height, run.width, fail)
        if not np.array_equal(rendered, read_rgb(files["layout"], "layout")):
            raise UserError(f"{path}: regions: they no longer give the run's layout {files['layout']} (was the "
                            f"record edited?)")
    return config, run


def read_scoring_record(path):
    """(prompt, subject names, record) of a record, for evaluate.py; the keys of the region scores (SCORING_KEYS)
    are checked where the record has them all (older records may not: then there are no region scores)."""
    record = _read(path, ("prompt", "subject_list"))
    prompt, subjects = record["prompt"], record["subject_list"]
    if not isinstance(prompt, str):
        raise UserError(f"{path}: prompt: expected a string (was the record edited?)")
    if not isinstance(subjects, list) or not all(isinstance(e, list) and e and isinstance(e[0], str)
                                                 for e in subjects):
        raise UserError(f"{path}: subject_list: expected [[name, position], ...] (was the record edited?)")
    if all(key in record for key in SCORING_KEYS):
        check_scoring_keys(path, record)
    return prompt, [name for name, *_ in subjects], record


def check_scoring_keys(path, record):
    """The record's region keys hold what inference.py writes there; an edited one is a UserError naming it."""
    def bad(key, expected):
        raise UserError(f"{path}: {key}: expected {expected}, got {str(record[key])[:80]} (was the record edited?)")

    def integer(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(record["layout"], str):
        bad("layout", "a file path")
    if not isinstance(record["file_sha256"], dict) or not all(isinstance(v, str) for v in record["file_sha256"].values()):
        bad("file_sha256", "an object {key: sha256}")
    context = record["color_context"]
    if not isinstance(context, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and is_finite32(v[1])
            for v in context.values()):
        bad("color_context", '{"r,g,b": [phrase, weight]}')
    for colour in context:
        parse_colour(colour, lambda message: bad("color_context", f"colours as keys ({message})"))
    rows = record["token_rows"]
    if not isinstance(rows, dict) or set(rows) - set(context) or not all(
            isinstance(v, list) and all(integer(row) for row in v) for v in rows.values()):
        bad("token_rows", "an object {colour of color_context: [token rows]}")
    if not isinstance(record["subject_list"], list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and integer(e[1])
            for e in record["subject_list"]):
        bad("subject_list", "[[name, position], ...]")
