"""Writing PyTorch `.pth` state dicts from numpy, bit-exactly (bf16 included), atomically.

torch is imported lazily: only code paths that write PyTorch files need it. Reading needs no
torch: `jaxlora.weights.torch_zip.TorchZipReader`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from jaxlora.weights.jaxlora_dir import plain_mode


def require_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading or writing PyTorch files needs torch: pip install 'jaxlora[torch]'") from e
    return torch


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor -> numpy with the same bits; bfloat16 becomes ml_dtypes.bfloat16."""
    torch = require_torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_tensor(a: np.ndarray) -> Any:
    """numpy (ml_dtypes.bfloat16 included) -> a torch tensor with the same bits."""
    torch = require_torch()
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """torch.save a flat dict of numpy arrays, atomically (temp file in the same folder, then rename)."""
    torch = require_torch()
    tensors = {k: numpy_to_tensor(v) for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call write(tmp_path), then rename tmp_path to path; no half file under `path`, ever. The
    file ends with the permissions a plain write gives under the umask (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, plain_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
