"""The artifact store against a plain local root, a file:// URI and pyarrow's in-memory mock."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.orchestrator.store.artifact_store import ArtifactStore


def tree(root: Path) -> dict[str, str]:
    """Every file under root, as relative path -> text."""
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_dir(path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


NESTED = {"adapter_config.json": "{}", "weights.bin": "w", "sub/deeper/state.pt": "s"}


@pytest.fixture(params=["path", "file-uri"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    root = tmp_path / "artifacts"
    return ArtifactStore(str(root) if request.param == "path" else root.as_uri())


def test_uris_follow_the_layout(store: ArtifactStore) -> None:
    assert store.adapter_uri("job-1") == f"{store.root}/adapters/job-1"
    assert store.checkpoint_uri("job_2") == f"{store.root}/checkpoints/job_2"


def test_round_trip_of_a_nested_dir(store: ArtifactStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src", NESTED)
    uri = store.checkpoint_uri("j1")
    assert not store.exists(uri)
    store.upload_dir(src, uri)
    assert store.exists(uri)
    out = store.download_dir(uri, tmp_path / "out" / "j1")
    assert out == tmp_path / "out" / "j1"
    assert tree(out) == NESTED


def test_a_jobs_checkpoints_are_deleted_and_no_others(store: ArtifactStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src", NESTED)
    for job_id in ("j1", "j2"):
        store.upload_dir(src, store.checkpoint_uri(job_id))
    store.upload_dir(src, store.adapter_uri("j1"))
    store.delete_checkpoints("j1")
    store.delete_checkpoints("j3")  # none: not an error
    assert not store.exists(store.checkpoint_uri("j1"))
    assert store.exists(store.checkpoint_uri("j2")) and store.exists(store.adapter_uri("j1"))


def test_upload_replaces_old_files(store: ArtifactStore, tmp_path: Path) -> None:
    uri = store.checkpoint_uri("j1")
    store.upload_dir(make_dir(tmp_path / "v1", {"old.bin": "1", "sub/old.txt": "1"}), uri)
    store.upload_dir(make_dir(tmp_path / "v2", {"new.bin": "2"}), uri)
    assert tree(store.download_dir(uri, tmp_path / "out")) == {"new.bin": "2"}
    # Nothing staged beside the target is left behind.
    assert [p.name for p in (tmp_path / "artifacts" / "checkpoints").iterdir()] == ["j1"]


def test_local_path_lets_workers_write_in_place(store: ArtifactStore, tmp_path: Path) -> None:
    uri = store.adapter_uri("j1")
    local = store.local_path(uri)
    assert local == tmp_path / "artifacts" / "adapters" / "j1"
    make_dir(local, {"adapter_config.json": "{}"})
    store.upload_dir(local, uri)  # uploading a dir onto itself keeps it
    assert tree(local) == {"adapter_config.json": "{}"}
    with pytest.raises(ValueError, match="contains"):
        store.upload_dir(local.parent, uri)


def test_fetch_adapter(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished adapter for job 'j1'"):
        store.fetch_adapter("j1", tmp_path / "out")
    # A directory without adapter_config.json is not a finished adapter.
    store.upload_dir(make_dir(tmp_path / "partial", {"weights.bin": "w"}), store.adapter_uri("j1"))
    with pytest.raises(FileNotFoundError, match="no finished adapter"):
        store.fetch_adapter("j1", tmp_path / "out")
    store.upload_dir(make_dir(tmp_path / "done", NESTED), store.adapter_uri("j1"))
    assert tree(store.fetch_adapter("j1", tmp_path / "out")) == NESTED


def test_download_of_a_missing_uri_names_it(store: ArtifactStore, tmp_path: Path) -> None:
    uri = store.checkpoint_uri("nope")
    with pytest.raises(FileNotFoundError, match=uri):
        store.download_dir(uri, tmp_path / "out")


def test_delete(store: ArtifactStore, tmp_path: Path) -> None:
    uri = store.checkpoint_uri("j1")
    store.upload_dir(make_dir(tmp_path / "src", NESTED), uri)
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # deleting twice is fine


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "UPPER", "/abs", "-lead", "a\n", "x" * 82])
def test_job_ids_are_validated(store: ArtifactStore, tmp_path: Path, bad: str) -> None:
    for call in (store.adapter_uri, store.checkpoint_uri):
        with pytest.raises(ValueError, match="invalid job id"):
            call(bad)
    with pytest.raises(ValueError, match="invalid job id"):
        store.fetch_adapter(bad, tmp_path / "out")


@pytest.mark.parametrize(
    "rel", ["/../outside", "/adapters/../../outside", "/adapters/./j1", "", "/", "x/sibling"]
)
def test_uris_outside_the_root_are_refused(store: ArtifactStore, tmp_path: Path, rel: str) -> None:
    uri = store.root + rel
    src = make_dir(tmp_path / "src", {"f": "x"})
    for call in (
        lambda: store.upload_dir(src, uri),
        lambda: store.download_dir(uri, tmp_path / "out"),
        lambda: store.delete(uri),
        lambda: store.exists(uri),
    ):
        with pytest.raises(ValueError, match="not inside the artifact root"):
            call()
    assert not (tmp_path / "outside").exists()


def test_root_outside_uri_with_a_shared_prefix(tmp_path: Path) -> None:
    # "<root>-other" starts with the root's text but is not under it.
    store = ArtifactStore(str(tmp_path / "root"))
    with pytest.raises(ValueError, match="not inside"):
        store.delete(str(tmp_path / "root-other" / "x"))


def test_plain_paths_are_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("rel/../store/")
    assert store.root == str(tmp_path / "store")
    assert store.local_path(store.adapter_uri("j")) == tmp_path / "store" / "adapters" / "j"


def test_remote_filesystem_has_no_local_path(tmp_path: Path) -> None:
    # pyarrow's in-memory mock filesystem stands in for an object store: no network.
    store = ArtifactStore("mock://bucket/prefix/")
    assert store.root == "mock://bucket/prefix"
    uri = store.adapter_uri("j1")
    assert store.local_path(uri) is None
    store.upload_dir(make_dir(tmp_path / "v1", {"stale": "1"}), uri)
    store.upload_dir(make_dir(tmp_path / "v2", NESTED), uri)
    assert tree(store.fetch_adapter("j1", tmp_path / "out")) == NESTED
    store.delete(uri)
    assert not store.exists(uri)
