"""Read a Hugging Face model directory's ``*.safetensors`` (single file or sharded with an index), mmapped."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from chatcore.errors import ModelFormatError

INDEX = "model.safetensors.index.json"


class SafetensorsDir:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        index = directory / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise ModelFormatError(f"{index} is malformed ({exc}); re-download the model") from None
            if not isinstance(weight_map, dict):
                raise ModelFormatError(f"{index} is malformed (its weight_map is not an object); re-download the model")
            inside = directory.resolve()
            for name, file in weight_map.items():
                where = (directory / str(file)).resolve()
                if not isinstance(file, str) or not where.is_relative_to(inside):
                    raise ModelFormatError(f"{index} names {str(file)!r} for {name!r}, outside the model directory; "
                                           "a shard must be a file of the directory")
                self._where[name] = directory / file
            missing = sorted({p.name for p in self._where.values() if not p.exists()})
            if missing:
                raise ModelFormatError(f"{directory} lacks shard(s) {', '.join(missing)} named in {INDEX}")
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise ModelFormatError(
                    f"{directory} has no *.safetensors weights (PyTorch .bin checkpoints are not read); "
                    "convert the model to safetensors")
            for file in files:
                for name in self._handle(file).keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    self._where[name] = file

    def _handle(self, file: Path):  # noqa: ANN202 - safetensors' handle type is private
        handle = self._open.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise ModelFormatError(f"{file} is corrupt or truncated ({exc}); re-download it") from None
            self._open[file] = handle
        return handle

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._where[name]
        try:
            return tuple(self._handle(file).get_slice(name).get_shape())
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelFormatError(f"{file}: tensor {name!r} cannot be read ({exc}); re-download it") from None

    def get(self, name: str) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise ModelFormatError(f"{self.directory} lacks the tensor {name!r}; the checkpoint is incomplete")
        try:
            return self._handle(file).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelFormatError(f"{file}: tensor {name!r} cannot be read ({exc}); re-download it") from None

    def get_part(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``get(name)[index]``, reading only those bytes (a tensor-parallel rank reads its shard this way)."""
        file = self._where.get(name)
        if file is None:
            raise ModelFormatError(f"{self.directory} lacks the tensor {name!r}; the checkpoint is incomplete")
        try:
            return self._handle(file).get_slice(name)[index]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelFormatError(f"{file}: tensor {name!r} cannot be read ({exc}); re-download it") from None
