"""The error protocol and the command-line helpers every script shares (no torch: numpy-only modules use it).

Errors a user can fix are raised as `UserError` and printed as one line, exit status 2, by `run_cli`; the
scripts' parser reports its own mistakes the same way; numbers and sizes from the command line are checked
by the small functions here.
"""
import argparse
import importlib
import math
import platform
import sys

import numpy as np


MAX_IMAGE_SIDE = 8192  # pixels; beyond it a layout or latent would not fit any GPU's memory


MAX_SEED = 2 ** 32 - 1  # seeds are combined with sample indices into 64-bit generator seeds

FLOAT32_MAX = float(np.finfo(np.float32).max)


class UserError(Exception):
    """Bad input a user can fix: printed as one line, exit status 2, no traceback."""


def run_cli(main, args):
    """Run `main(args)`; a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def one_line(message):
    """A message as one printable line: every character Python does not print as it is (a newline, a terminal
    escape, C1 controls, Unicode line separators, read from a file) shown as its escape, so a message is one
    line whatever text it quotes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: --help shows the defaults, and a bad argument is one line `error: ...` with exit
    status 2, like every other mistake (argparse's own prints its usage first)."""

    def __init__(self, description=None, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default after its help; None (the help says what happens then) and off flags
    are left out."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def check_at_least(args, minimum, *names, maximum=None):
    """Each named command-line integer (None: not given) must be >= minimum (and <= maximum if given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and (value < minimum or (maximum is not None and value > maximum)):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise UserError(f"--{name} {value}: expected an integer {bound}")


def check_multiple_of_8(args, *names, maximum=MAX_IMAGE_SIDE):
    """Image sizes (None: not given) must be positive multiples of 8: the VAE's latents are 1/8 of the image."""
    for name in names:
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8 or value > maximum):
            raise UserError(f"--{name} {value}: expected a positive multiple of 8, at most {maximum}")


def is_finite32(value):
    """A number (not a bool) that is finite and stays finite as a float32 (1e39 does not)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= FLOAT32_MAX)


def check_finite(args, *names):
    """Each named command-line float (None: not given) must be finite in float32: nan or inf would reach the
    images or the residual as NaN."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not is_finite32(value):
            raise UserError(f"--{name} {value}: expected a finite number (at most {FLOAT32_MAX:.3g} in size)")


def require_package(flag, package):
    """An optional dependency a flag needs: a missing one is one line naming the flag and the pip command."""
    try:
        __import__(package)
    except ImportError:
        raise UserError(f"{flag} needs {package}: pip install {package}") from None


def library_versions(libraries=("torch", "diffusers", "transformers")):
    """Python's version and each named library's, for the record saved with an output."""
    return {"python": platform.python_version(),
            **{name: importlib.import_module(name).__version__ for name in libraries}}


def first_line(e):
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
