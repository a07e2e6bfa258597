"""One setting of config keys measured beside the best setting, in the toy world, on the same residuals.

    python toy/compare.py '{"region_self_attention": true, "residual_guidance": 3.0, "residual_guidance_in_region": true}'

For trying a change to the method: the residuals are toy/measure.py's (trained into --out once, reused after),
the cells are its fidelity and composition cells (each concept alone with its residual, without it, on the
wrong token, and every pair composed with and without layout guidance), the figures its results.json's. Prints
both settings' figures and writes them to compare.json in --out (default toy/runs/, untracked).
"""
import argparse
import json
import time
from pathlib import Path

import measure  # toy/measure.py, beside this script; it puts the project's scripts on the path


def compare(keys, out, seeds):
    """{"best": figures, "setting": figures, "keys": keys}: BEST and BEST's training with `keys` instead of its
    config keys, each through measure.py's cells."""
    measurement = measure.Measurement(out, seeds)
    measurement.train([measure.BEST["training"]])
    settings = {"best": measure.BEST, "setting": {"config": keys, "training": measure.BEST["training"],
                                                  "tag": "compared"}}
    figures = {}
    for label, setting in settings.items():
        fidelity, composition = measurement.fidelity(setting, False), measurement.composition(setting, False)
        figures[label] = measure.summary(fidelity, composition)
    return {**figures, "keys": keys, "seeds": seeds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("keys", help="the setting: a JSON object of config keys")
    p.add_argument("--seeds", type=int, default=32, help="samples per cell")
    p.add_argument("--out", default=str(measure.DEFAULT_OUT), help="where the residuals and cells are kept")
    args = p.parse_args(argv)
    keys = json.loads(args.keys)
    start = time.time()
    result = compare(keys, Path(args.out), args.seeds)
    result["minutes"] = round((time.time() - start) / 60, 1)
    (Path(args.out) / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    for label in ("best", "setting"):
        print(label, json.dumps({k: round(v, 3) for k, v in result[label].items() if isinstance(v, float)}))
    return result


if __name__ == "__main__":
    main()
