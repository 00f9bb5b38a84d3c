"""SafeTensorFiles: one safetensors file, a directory of them or a `*.index.json` weight map, read
as a key -> file index and tensors opened file by file. The readers of every checkpoint form
(loaders.py, ktransformers.py, native.py) build on it."""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import torch

INDEX_NAME = "model.safetensors.index.json"


def safe_open(path: str):
    from safetensors import safe_open

    return safe_open(path, framework="pt")


def open_shard(file: str, key: str):
    """The safetensors handle of the shard the index says holds `key`, with errors naming both."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"file {file} (holding tensor {key!r}) does not exist")
    try:
        return safe_open(file)
    except Exception as e:  # safetensors' own error type for a bad header
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None


def _file_keys(path: str) -> list[str]:
    try:
        with safe_open(path) as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _read_index(index_path: str) -> dict[str, str]:
    with open(index_path) as fh:
        try:
            index = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path} is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} must hold a 'weight_map' object mapping tensor names to file names")
    # Shard names are relative to the index; shards are checked only when a tensor is read, so a
    # partly downloaded checkpoint still serves the layers it has.
    root = os.path.dirname(os.path.abspath(index_path))
    return {key: os.path.join(root, name) for key, name in weight_map.items()}


def check_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device or a name like 'cpu', got {device!r}") from e


def check_base_key(base_key) -> str:
    if not isinstance(base_key, str) or not base_key:
        raise TypeError(f"base_key must be a non-empty str like 'model.layers.0', got {base_key!r}")
    return base_key


class SafeTensorFiles:
    """`path`: a safetensors file, a directory of them, or a `*.index.json` weight map. A directory's
    `model.safetensors.index.json`, when present, is used instead of scanning its `*.safetensors`
    files. Only the index is built up front; every file is opened inside a `with` block."""

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = os.fspath(path)
        # Files of a directory whose header cannot be read: skipped, so that one damaged file does
        # not stop the layers the other files hold from loading; named in every "not found" error.
        self._unreadable: dict[str, str] = {}
        self.key_to_file = self._build_index(self.path)

    def _not_found_hint(self) -> str:
        if not self._unreadable:
            return ""
        return " (unreadable, so not searched: " + "; ".join(f"{f}: {e}" for f, e in self._unreadable.items()) + ")"

    def _build_index(self, path: str) -> dict[str, str]:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, INDEX_NAME)):
                return _read_index(os.path.join(path, INDEX_NAME))
            names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if not names:
                raise FileNotFoundError(f"path {path!r} is a directory without *.safetensors files")
            key_to_file = {}
            for name in names:
                file = os.path.join(path, name)
                try:
                    keys = _file_keys(file)
                except ValueError as e:
                    self._unreadable[file] = str(e.__cause__ or e)
                    continue
                for key in keys:
                    if key in key_to_file:
                        raise ValueError(
                            f"tensor {key!r} is in both {key_to_file[key]} and {file}; "
                            f"remove one or add a {INDEX_NAME} that picks one"
                        )
                    key_to_file[key] = file
            if not key_to_file and self._unreadable:
                file, error = next(iter(self._unreadable.items()))
                raise ValueError(f"{file} is not a readable safetensors file: {error}; no file of {path} is")
            return key_to_file
        if os.path.isfile(path):
            if path.endswith(".json"):
                return _read_index(path)
            return dict.fromkeys(_file_keys(path), path)
        raise FileNotFoundError(f"path {path!r} does not exist")

    # Nothing is held between calls; these exist so callers can treat the loader like a file.
    def close(self) -> None:
        pass

    def close_all_handles(self) -> None:
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def has_tensor(self, key: str) -> bool:
        return key in self.key_to_file

    def iter_tensors(self, keys: Iterable[str], device) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for `keys`, opening each file once; order follows the files."""
        device = check_device(device)
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.key_to_file:
                raise KeyError(f"tensor {key!r} is not in {self.path}{self._not_found_hint()}")
            by_file.setdefault(self.key_to_file[key], []).append(key)
        for file, file_keys in by_file.items():
            with open_shard(file, file_keys[0]) as f:
                present = set(f.keys())
                for key in file_keys:
                    if key not in present:
                        raise KeyError(f"tensor {key!r} is not in {file}, where the index places it")
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:  # e.g. a truncated file
                        raise ValueError(f"{file}: cannot read tensor {key!r}: {e}") from None
                    yield key, tensor.to(device)

    def load_tensor(self, key: str, device="cpu") -> torch.Tensor:
        return next(self.iter_tensors([key], device))[1]

    def _shape(self, key: str) -> list[int]:
        file = self.key_to_file[key]
        with open_shard(file, key) as f:
            if key not in set(f.keys()):
                raise KeyError(f"tensor {key!r} is not in {file}, where the index places it")
            return list(f.get_slice(key).get_shape())
