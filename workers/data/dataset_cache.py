"""One read and tokenization per dataset file, however many jobs of an engine use it.

Jobs often share a file (one dataset, several learning rates or ranks). A
`TokenizedDataset` is immutable, so those jobs can hold the same one. The key
is the file's version (path, modification time, size) with the settings that
shape the rows (format, max_seq_length); the tokenizer is the cache's own, so
a file changed on disk, or read with other settings, is read again.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from carpool.workers.data.dataset import TokenizedDataset, load_dataset

FileVersion = tuple[str, int, int]


def file_version(path: Path) -> FileVersion | None:
    """(path, mtime in ns, size) of a file: another version after any write; None if unreadable."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


class DatasetCache:
    """The datasets one tokenizer has made, kept while a job still holds them.

    Values are weak: a long-lived engine does not keep the data of jobs it has
    let go, and a job admitted later still shares a file with the jobs running.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._held: weakref.WeakValueDictionary[tuple, TokenizedDataset] = (
            weakref.WeakValueDictionary()
        )

    def load(self, path: Path, fmt: str, max_seq_length: int) -> TokenizedDataset:
        """`load_dataset(path, fmt, tokenizer, max_seq_length)`, read once per file version."""
        # Stat before reading: a write during the read leaves a key that no later stat matches.
        version = file_version(path)
        if version is None:  # load_dataset reports the missing file
            return load_dataset(path, fmt, self.tokenizer, max_seq_length)
        key = (version, fmt, max_seq_length)
        dataset = self._held.get(key)
        if dataset is None:
            dataset = load_dataset(path, fmt, self.tokenizer, max_seq_length)
            self._held[key] = dataset
        return dataset
