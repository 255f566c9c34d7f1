"""What the endpoint serves: bases, adapter versions and the names that reach them.

A version never changes once made: a queue adapter's id is its job id
(`support-1a2b3c4d`), a directory's its name and a hash of its files. A bare name
is an alias of the newest version of that name, so a retrained adapter answers
under its name at once, and its older version still answers under its own id.
A DyLoRA adapter adds `<id>@rank-<b>` versions (and `<name>@rank-<b>` aliases) for
its other exported ranks. No Ray and no torch here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from carpool.workers.base.base_fingerprint import read_provenance

BASE_ALIAS = "base"  # `model: base` when one base is served


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ServedBase:
    key: str  # the deployment's name
    base_model: str
    quantization: dict | None  # a QuantizationSpec's fields, or None: full precision


@dataclass(frozen=True)
class AdapterVersion:
    id: str  # what requests and replicas know it by
    name: str  # its alias
    base: str  # a ServedBase's key
    path: str  # its PEFT directory on this node
    root: str  # where it came from: `job <id>` or the directory
    created: float  # newer versions take the alias


def base_key(base_model: str, quantization: dict | None) -> str:
    """A deployment name for a (base, quantization): readable, and unique for both."""
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", Path(base_model).name or base_model).strip("-")[:32]
    identity = json.dumps([base_model, quantization], sort_keys=True).encode()
    return f"base-{slug}-{hashlib.sha256(identity).hexdigest()[:8]}"


def directory_hash(path: Path) -> str:
    """A hash of an adapter directory's files (its config and weights, not sub-ranks)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:8]


def with_ranks(version: AdapterVersion) -> list[AdapterVersion]:
    """The version, and for a DyLoRA adapter one more per other exported rank."""
    out = [version]
    record = read_provenance(version.path) or {}
    if record.get("adapter_kind") != "dylora":
        return out
    for b in record.get("dylora_ranks", []):
        rank_dir = Path(version.path) / f"rank-{b}"
        if b != record.get("dylora_rank") and rank_dir.is_dir():
            out.append(
                AdapterVersion(
                    id=f"{version.id}@rank-{b}",
                    name=f"{version.name}@rank-{b}",
                    base=version.base,
                    path=str(rank_dir),
                    root=f"{version.root} (rank {b})",
                    created=version.created,
                )
            )
    return out


class AdapterCatalog:
    def __init__(self) -> None:
        self.bases: dict[str, ServedBase] = {}
        self.versions: dict[str, AdapterVersion] = {}
        self._aliases: dict[str, str] = {}  # name -> id of its newest version

    def add_base(self, base_model: str, quantization: dict | None) -> ServedBase:
        served = ServedBase(base_key(base_model, quantization), base_model, quantization)
        self.bases.setdefault(served.key, served)
        return served

    def add(self, version: AdapterVersion) -> None:
        if version.base not in self.bases:
            raise ValueError(f"adapter {version.id}: base {version.base} is not served")
        for v in with_ranks(version):
            self.versions[v.id] = v
            newest = self.versions.get(self._aliases.get(v.name, ""))
            if newest is None or (v.created, v.id) >= (newest.created, newest.id):
                self._aliases[v.name] = v.id

    def resolve(self, model: str) -> tuple[ServedBase, AdapterVersion | None]:
        """A request's `model`: a version id, an alias, a base's `base_model`, or `base`
        when one base is served. (base, None) for the bare base."""
        version = self.versions.get(model) or self.versions.get(self._aliases.get(model, ""))
        if version is not None:
            return self.bases[version.base], version
        for served in self.bases.values():
            if served.base_model == model:
                return served, None
        if model == BASE_ALIAS and len(self.bases) == 1:
            return next(iter(self.bases.values())), None
        raise UnknownModelError(f"the model {model!r} does not exist")

    def models(self) -> list[dict]:
        """`GET /v1/models`: every base, every alias and every version."""
        out = [
            {"id": b.base_model, "object": "model", "owned_by": "carpool", "root": b.base_model}
            for b in self.bases.values()
        ]
        listed = [(name, self.versions[vid]) for name, vid in sorted(self._aliases.items())]
        listed += [(v.id, v) for v in sorted(self.versions.values(), key=lambda v: v.id)]
        for model_id, v in listed:
            out.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": int(v.created),
                    "owned_by": "carpool",
                    "parent": self.bases[v.base].base_model,
                    "root": v.root,
                    **({"version": v.id} if model_id != v.id else {}),
                }
            )
        return out
