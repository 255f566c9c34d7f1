"""A directory that appears whole or not at all."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh directory beside `final`; renamed to `final` when the block ends
    without error, removed when it fails, so `final` never holds half a result.

    `final` must be absent or an empty directory (the caller refuses anything else).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # Beside `final`, on the same filesystem, so the rename is atomic.
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield partial
        if final.is_dir():
            final.rmdir()  # empty, or this raises rather than overwrite
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
