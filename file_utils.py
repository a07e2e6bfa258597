"""Reading what users give and writing what the project makes: one home for both, shared by every script.

Reading: configs are JSON read strictly (duplicate keys and absurd nesting are errors); only regular files
are opened (a FIFO or a device would block or never end); images go through one function, so photos,
layouts and generated images get the same EXIF orientation, the same handling of 16-bit, palette and
transparent images and the same size limit in training, inference and evaluation.
Writing: every file is written beside its destination and renamed into place, so after a crash or a full
disk it is whole or absent, and it gets the permissions the user's umask gives a new file.
"""
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cli_utils import UserError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
MAX_JSON_DEPTH = 64  # configs nest three levels; deeper is not a config


# ------------------------------------------------------------------------------------------------
# Reading

def regular_file(path, what):
    """`path` as a Path if it is a regular file (or a link to one); a UserError otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise UserError(f"{path}: {what} is {kind}")
    return path


def resolve_relative(value, base):
    """The file or folder `value` names: as given if absolute; a relative one beside `base` first (the config
    or list that names it), then in the working directory. None if neither exists."""
    for candidate in (Path(base) / value, Path(value)):
        if candidate.exists():
            return candidate.resolve()
    return None


def read_json(path, what):
    """The JSON value in file `path`; bad JSON, duplicate keys and deep nesting are one-line errors."""
    path = regular_file(path, what)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as Windows editors write, is not an error
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    return parse_json(text, path, what)


def parse_json(text, source, what):
    """The JSON value of `text` read as strictly as a file (read_json); messages start with `source`."""
    def no_duplicates(pairs):
        value = dict(pairs)
        if len(value) < len(pairs):  # linear: a hostile object of many keys must not take quadratic time
            seen = set()
            repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise UserError(f"{source}: key '{repeated}' appears twice in one object (JSON keeps only the last)")
        return value

    if _nesting(text) > MAX_JSON_DEPTH:
        raise UserError(f"{source}: nested deeper than {MAX_JSON_DEPTH} levels; not a {what}")
    try:
        return json.loads(text.removeprefix("\ufeff"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: not valid JSON ({e})") from None
    except ValueError as e:  # Python refuses integers of over 4300 digits
        raise UserError(f"{source}: not a usable JSON value ({e})") from None


def _nesting(text):
    """The deepest nesting of [ and { in JSON text, outside strings (checked before json.loads recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_image(path, what="image"):
    """An RGB PIL image of file `path`, upright (EXIF orientation applied).

    16-bit greyscale is scaled to 8 bits (a plain convert would clip it to white); palette and transparent
    images keep their colours (alpha is dropped, as the reference does); images over Pillow's MAX_IMAGE_PIXELS
    (89 million) are refused before they are decoded.
    """
    path = regular_file(path, what)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that: both are refusals here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: refused: more pixels than an image may have ({Image.MAX_IMAGE_PIXELS}; "
                        f"a small file can hold a huge image)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image (not an image format Pillow knows)") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decoders raise all of these on broken files
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:120]})") from None


def _to_rgb(image):
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16-bit (or wider) greyscale
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def read_rgb(path, what="image"):
    """read_image as a uint8 array [H, W, 3]."""
    return np.asarray(read_image(path, what))


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_files(folder, what, exclude=()):
    """The image files in `folder` (by extension, regular files only, sorted); a UserError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder}: folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and p.name not in exclude)
    if not files:
        raise UserError(f"{what} {folder}: no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


# ------------------------------------------------------------------------------------------------
# Writing

def check_output_file(path, what):
    """Before any work: `path` is absent or a regular file (a folder or a FIFO there could not be replaced)."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise UserError(f"{what} {path}: exists and is not a regular file")


def remove_path(path):
    """Remove a file, a link or a folder tree at `path`, if anything is there."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def check_writable_folder(folder, what):
    """Before any work: `folder` is a folder, or can be made as one, that this user can write in."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder}: cannot write in {existing} (permission denied)")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write):
    """Call write(tmp_path) beside `path`, then rename it into place: whole or absent, never half written.

    The file gets the mode a new file gets under the user's umask (a temporary file starts as 0600). A full
    disk or a folder that cannot be written is a UserError naming the file.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, value):
    """Strict JSON only: a NaN or an infinity in `value` is an error, never written as the non-JSON NaN."""
    try:
        text = json.dumps(value, indent=2, allow_nan=False)
    except ValueError:
        raise UserError(f"{path}: refused to write a NaN or infinite number into JSON") from None
    write_text(path, text + "\n")


def write_png(path, image):
    """A uint8 array [H, W, 3] or a PIL image, as a lossless PNG."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
