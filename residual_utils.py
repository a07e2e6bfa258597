"""Residual embeddings: the 4 KB a concept is learned into (docs/METHOD.md A.7), and where they go in a prompt.

A residual is a float32 tensor [k, d]: k token rows (`token_num`), d the text encoder's width (768 for
SD 1.x, 1024 for SD 2.x, 2048 for SDXL's two encoders side by side). It is added to rows p .. p+k-1 of the
prompt's text embedding, where p is the position of the concept's class word.

Files:
- `.safetensors` (written by train.py): one tensor `residual` [k, d] and string metadata
  `class_phrase`, `token_num`, `embedding_dim`, `base_model`, `family` (`sd` or `sdxl`; files without it are
  told apart by their width) and the training settings.
- legacy `.pt` (the seed's files): a bare float tensor [1, d]. Read with `weights_only=True` on the CPU, so a
  pickle holding anything else is refused, never executed.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli_utils import UserError
from file_utils import regular_file, write_atomic

REQUIRED_METADATA = ("class_phrase", "token_num", "embedding_dim", "base_model")
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "flux": "FLUX.1"}  # the `family` a residual may record


@dataclass
class Residual:
    tensor: torch.Tensor  # [k, d] float32
    path: str
    metadata: dict = field(default_factory=dict)

    @property
    def token_num(self):
        return self.tensor.shape[0]

    @property
    def embedding_dim(self):
        return self.tensor.shape[1]

    @property
    def class_phrase(self):
        return self.metadata.get("class_phrase")

    @property
    def text_length(self):
        """The text length it was trained with (train.py records its settings); None where nothing says."""
        import json

        try:
            return json.loads(self.metadata.get("training", "{}")).get("text_length")
        except (ValueError, AttributeError):
            return None

    @property
    def family(self):
        """The model family it was trained on ('sd' or 'sdxl'): recorded by train.py; files without it (the
        seed's) are told apart by their width, 2048 being SDXL's."""
        return self.metadata.get("family") or ("sdxl" if self.embedding_dim == 2048 else "sd")


def load_residual(path):
    """Read a residual from `.safetensors` or a legacy `.pt`; any problem is a UserError naming the file."""
    path = regular_file(path, "residual file")
    kind = file_kind(path)
    if kind == "safetensors":
        tensor, metadata = _load_safetensors(path)
    elif kind == "torch":
        tensor, metadata = _load_legacy(path), {}
    else:
        raise UserError(f"{path}: not a residual file (neither safetensors nor a torch .pt file)")
    if (tensor.layout != torch.strided or tensor.is_meta or not tensor.is_floating_point()
            or tensor.ndim not in (1, 2) or tensor.numel() == 0):
        kind = "" if tensor.layout == torch.strided else f"{str(tensor.layout).replace('torch.', '')} "
        kind = "meta (no values) " if tensor.is_meta else kind
        raise UserError(f"{path}: expected a dense float tensor [k, d], got a {kind}{tensor.dtype} "
                        f"{list(tensor.shape)}")
    tensor = tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float32).contiguous()
    check_finite_rows(tensor, path)
    family = metadata.get("family")
    if family is not None and family not in FAMILY_NAMES:
        hint = f" (names are lower case: '{family.lower()}')" if family.lower() in FAMILY_NAMES else ""
        raise UserError(f"{path}: metadata family: unknown model family {family[:40]!r}{hint}; expected one of "
                        f"{', '.join(FAMILY_NAMES)}")
    return Residual(tensor, str(path), metadata)


def file_kind(path):
    """'safetensors', 'torch' or None, from the file's first bytes (not its name): safetensors begins with an
    8-byte header length and then '{'; torch.save writes a zip archive or, in its legacy format, a pickle."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "torch"
    return None


def check_finite_rows(tensor, path):
    """A residual [k, d] with a NaN or an infinity (also one that overflows float32) would make every image
    black: a UserError naming the file and the rows."""
    bad = (~torch.isfinite(tensor)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"{path}: row{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of the residual "
                        f"[{tensor.shape[0]}, {tensor.shape[1]}] hold NaN or infinite values")


def _load_safetensors(path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys != ["residual"]:
                raise UserError(f"{path}: expected one tensor named 'residual', found {keys}")
            return f.get_tensor("residual"), dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def _load_legacy(path):
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global other than tensors and plain containers
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise UserError(f"{path}: refused to load: the pickle holds more than a tensor ({first})") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable residual file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{path}: expected a tensor, found {type(obj).__name__}")
    return obj


def save_residual(path, tensor, metadata):
    """Write `tensor` [k, d] and string metadata as safetensors, via a temporary file and a rename."""
    from safetensors.torch import save_file

    tensor = tensor.detach().to("cpu", torch.float32).contiguous()
    assert tensor.ndim == 2, f"residual must be [k, d], got {list(tensor.shape)}"
    check_finite_rows(tensor, path)
    metadata = {key: str(value) for key, value in metadata.items()}
    metadata.update(token_num=str(tensor.shape[0]), embedding_dim=str(tensor.shape[1]))
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    assert not missing, f"residual metadata lacks {missing}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file({"residual": tensor}, tmp, metadata=metadata))


def find_sequence(ids, seq):
    """Every position i with ids[i : i+len(seq)] == seq."""
    ids, seq, n = list(ids), list(seq), len(seq)
    if n == 0:
        return []
    return [i for i in range(len(ids) - n + 1) if ids[i:i + n] == seq]


def apply_residuals(embeddings, placements):
    """Add each residual to its rows: embeddings [..., L, d]; placements [(residual [k, d], position), ...].

    Returns a new tensor; rows p .. p+k-1 get residual rows 0 .. k-1 (docs/METHOD.md B1).
    """
    out = embeddings.clone()
    for residual, position in placements:
        k = residual.shape[0]
        out[..., position:position + k, :] += residual.to(out.device, out.dtype)
    return out
