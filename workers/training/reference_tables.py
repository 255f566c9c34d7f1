"""Precomputed reference log-probs (`precompute_ref_log_probs`): one table per dataset and
reference, kept in memory and on disk, reused across epochs, resumes and jobs.

A table holds, for each record of a preference dataset (by its index in the file's kept
records), the reference's log-prob of its chosen and of its rejected completion. Its key
names everything those numbers depend on: the base (its fingerprint and a sample of its
weights' bytes: two random bases of one config share a fingerprint), its quantization and
dtype, the tokenized rows themselves (so the file's content, the tokenizer and
`max_seq_length` at once), and the reference (the base alone, or the starting adapter's
files and spec). A key that misses costs one pass; a key that matched wrongly would train
silently against another reference, so the key errs on the side of missing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from carpool.workers.base.base_fingerprint import base_fingerprint, local_model_dir
from carpool.workers.data.dataset import TokenizedDataset
from carpool.workers.spec.job_spec import JobSpec

_SAMPLE_BYTES = 1 << 20  # from each end of each weight file


@lru_cache(maxsize=8)  # as base_fingerprint: a base's files are read once per process
def _weights_sample(base_model: str) -> list[tuple[str, int, str]]:
    """Each weight file's name, size and a digest of its first and last MiB."""
    model_dir = local_model_dir(base_model)
    if model_dir is None:
        return []
    sample = []
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(max(0, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
        sample.append((path.name, size, digest.hexdigest()))
    return sample


def _directory_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def table_key(
    base_model: str, quantization: Any, dtype: torch.dtype, dataset: TokenizedDataset, job: JobSpec
) -> str:
    """The hex key of `job`'s reference table over `dataset` (see the module's docstring)."""
    digest = hashlib.sha256()
    for part in (
        base_fingerprint(base_model) or f"name:{base_model}",
        repr(_weights_sample(base_model)),
        quantization.model_dump_json() if quantization is not None else "full precision",
        str(dtype),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    for pair in dataset.rows:
        for row in pair.rows:
            digest.update(repr((row.input_ids, row.labels)).encode())
    init_from = job.adapter.init_from
    if init_from is not None:  # the starting adapter is the reference
        digest.update(_directory_digest(Path(init_from)).encode())
        digest.update(job.adapter.model_dump_json().encode())
    return digest.hexdigest()


class ReferenceTables:
    """Tables by key: in memory for this process, and under `directory` when one is given
    (written whole, then renamed into place, so a reader never sees half a table)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._held: dict[str, torch.Tensor] = {}

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.pt"

    def get(self, key: str, records: int) -> torch.Tensor | None:
        """The [records, 2] float64 table of `key`, or None when none is kept."""
        table = self._held.get(key)
        path = self._path(key)
        if table is None and path is not None and path.is_file():
            try:
                table = torch.load(path, weights_only=True)
            except (OSError, RuntimeError, EOFError):
                return None  # unreadable: computed again and rewritten
            self._held[key] = table
        if table is not None and tuple(table.shape) != (records, 2):
            return None
        return table

    def put(self, key: str, table: torch.Tensor) -> None:
        self._held[key] = table
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(table, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
