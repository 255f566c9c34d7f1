"""Finished adapters and checkpoints under one storage root.

The root is a local directory on one machine, or a URI (s3://, gs://, hdfs://,
file://, anything `pyarrow.fs` understands) when workers on several nodes must
see the same files. Layout: `<root>/adapters/<job_id>` and
`<root>/checkpoints/<job_id>`.

Job ids reach paths, so they are checked against a strict pattern, and every
URI a caller passes back must lie strictly under the root: no method can read,
overwrite or delete anything outside it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from carpool.orchestrator.store.job_ids import validate_job_id
from pyarrow import fs

_LOCAL = fs.LocalFileSystem()


class ArtifactStore:
    def __init__(self, root: str) -> None:
        root = str(root)
        if "://" in root:
            self.root = root.rstrip("/")
        else:
            # A plain path: absolute so the same root means the same place from any cwd.
            self.root = os.path.abspath(os.path.expanduser(root))
        self._fs, base = fs.FileSystem.from_uri(self.root)
        self._base = base.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self._fs, fs.LocalFileSystem)

    def adapter_uri(self, job_id: str) -> str:
        return f"{self.root.rstrip('/')}/adapters/{validate_job_id(job_id)}"

    def checkpoint_uri(self, job_id: str) -> str:
        return f"{self.root.rstrip('/')}/checkpoints/{validate_job_id(job_id)}"

    def _path(self, uri: str) -> str:
        """The filesystem path of a URI strictly under the root; ValueError otherwise."""
        uri = str(uri)
        prefix = self.root.rstrip("/") + "/"
        rel = uri[len(prefix) :].strip("/") if uri.startswith(prefix) else ""
        parts = rel.split("/")
        if not rel or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"uri {uri!r} is not inside the artifact root {self.root!r}")
        return f"{self._base}/{rel}"

    def _info(self, path: str) -> fs.FileType:
        return self._fs.get_file_info(path).type

    def exists(self, uri: str) -> bool:
        return self._info(self._path(uri)) != fs.FileType.NotFound

    def delete(self, uri: str) -> None:
        """Remove a file or directory tree; a missing one is not an error."""
        path = self._path(uri)
        kind = self._info(path)
        if kind == fs.FileType.Directory:
            self._fs.delete_dir(path)
        elif kind != fs.FileType.NotFound:
            self._fs.delete_file(path)

    def delete_checkpoints(self, job_id: str) -> None:
        """Remove every checkpoint of a job (none is not an error)."""
        self.delete(self.checkpoint_uri(job_id))

    def local_path(self, uri: str) -> Path | None:
        """Where a URI lives on this machine's disk, so workers can write in place."""
        path = self._path(uri)
        return Path(path) if self.is_local else None

    def upload_dir(self, local_dir: Path, uri: str) -> None:
        """Make `uri` hold exactly the files under `local_dir` (old files are removed)."""
        path = self._path(uri)
        src = os.path.abspath(local_dir)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"no such directory to upload: {local_dir}")
        if self.is_local:
            dst = os.path.abspath(path)
            if src == dst:
                return  # a worker wrote in place via local_path(): already there
            if os.path.commonpath([src, dst]) in (src, dst):
                raise ValueError(f"cannot upload {src} into {dst}: one contains the other")
            self._replace_local(src, path)
            return
        # Object stores have no directory rename, so the swap cannot be atomic here.
        self.delete(uri)
        self._fs.create_dir(path)
        fs.copy_files(src, path, source_filesystem=_LOCAL, destination_filesystem=self._fs)

    def _replace_local(self, src: str, path: str) -> None:
        # Copy beside the target, then swap by rename, so a crash mid-copy never
        # leaves a half-written checkpoint under the real name. The `.` in the
        # staging names cannot occur in a job id, so they never collide with one.
        token = uuid.uuid4().hex[:8]
        staging, old = f"{path}.incoming-{token}", f"{path}.old-{token}"
        self._fs.create_dir(staging)
        try:
            fs.copy_files(src, staging, source_filesystem=_LOCAL, destination_filesystem=self._fs)
        except BaseException:
            self._fs.delete_dir(staging)
            raise
        if self._info(path) != fs.FileType.NotFound:
            self._fs.move(path, old)
        # If this rename fails, the previous contents survive at `old`, not lost.
        self._fs.move(staging, path)
        if self._info(old) != fs.FileType.NotFound:
            self._fs.delete_dir(old)

    def download_dir(self, uri: str, local_dir: Path) -> Path:
        """Copy the tree at `uri` into `local_dir` (created if needed) and return it."""
        path = self._path(uri)
        if self._info(path) != fs.FileType.Directory:
            raise FileNotFoundError(f"no artifact at {uri}")
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        fs.copy_files(
            path,
            str(local_dir.absolute()),
            source_filesystem=self._fs,
            destination_filesystem=_LOCAL,
        )
        return local_dir

    def fetch_adapter(self, job_id: str, out_dir: Path) -> Path:
        """Download a finished (PEFT-format) adapter; its config marks it complete."""
        uri = self.adapter_uri(job_id)
        if self._info(self._path(uri) + "/adapter_config.json") != fs.FileType.File:
            raise FileNotFoundError(f"no finished adapter for job {job_id!r} at {uri}")
        return self.download_dir(uri, out_dir)
