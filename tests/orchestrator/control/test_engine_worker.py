"""EngineWorker, the engine behind one rank, driven directly (no Ray)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from carpool.orchestrator.control.engine_worker import EngineWorker, JobAdmitted, admit_on_all_ranks
from carpool.workers.spec.job_spec import (
    AdapterSpec,
    DatasetSpec,
    JobInputError,
    JobSpec,
    TrainingSpec,
)

from tests.helpers.jobs import changed


def worker(tiny_base: Path, tmp_path: Path, **options) -> EngineWorker:
    return EngineWorker(
        "g1",
        str(tiny_base),
        **{"storage_root": str(tmp_path / "store"), **options},
        scratch_dir=tmp_path / "scratch",
        device="cpu",
    )


def config(datasets: dict[str, Path], steps: int = 2) -> JobSpec:
    training = TrainingSpec(max_steps=steps, batch_size=2, max_seq_length=16, save_steps=1)
    data = DatasetSpec(path=datasets["text"])
    # Name and base are the worker's: it renames the job to its id and has its own base.
    return JobSpec(
        name="ignored",
        base_model="ignored",
        dataset=data,
        adapter=AdapterSpec(r=2),
        training=training,
    )


def test_job_resumed_from_its_final_checkpoint_is_exported_at_admission(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    first = worker(tiny_base, tmp_path)
    assert first.add_job("job-a", config(datasets)).adapter is None
    first.run_round()
    (final,) = first.run_round()
    assert final.adapter is not None and final.checkpoint.endswith("step-00000002")
    shutil.rmtree(final.adapter)  # so only admission can write it again

    restarted = worker(tiny_base, tmp_path)  # the same store, as after a controller restart
    admitted = restarted.add_job("job-a", config(datasets), final.checkpoint)

    assert (admitted.step, admitted.adapter) == (2, final.adapter)
    assert restarted.engine.jobs == {}  # nothing left that a round would have to report
    assert (Path(admitted.adapter) / "adapter_model.safetensors").is_file()
    assert restarted.run_round() == []


@pytest.mark.parametrize("keep", [1, 2])
def test_a_job_keeps_its_newest_keep_checkpoints_in_the_store(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, keep: int
) -> None:
    w = worker(tiny_base, tmp_path, keep_checkpoints=keep)
    w.add_job("job-a", config(datasets, steps=4))
    uris = [r.checkpoint for _ in range(3) for r in w.run_round()]
    root = w.store.checkpoint_uri("job-a")
    assert uris == [f"{root}/step-{n:08d}" for n in (1, 2, 3)]
    kept = sorted(p.name for p in (tmp_path / "store" / "checkpoints" / "job-a").iterdir())
    assert kept == [f"step-{n:08d}" for n in (1, 2, 3)][-keep:]


def test_a_jobs_own_bad_input_raises_a_job_input_error_that_names_it(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": \n')
    no_adapter = tmp_path / "empty-adapter"
    no_adapter.mkdir()
    good = config(datasets)
    bad_inputs = {
        "dataset": changed(good, dataset=DatasetSpec(path=rows)),
        "eval_dataset": changed(good, eval_dataset=DatasetSpec(path=rows)),
        "init_from": good.model_copy(update={"adapter": AdapterSpec(init_from=no_adapter)}),
        "training": changed(good, training={"lr_scheduler_type": "bogus"}),
    }
    w = worker(tiny_base, tmp_path)
    errors = {}
    for source, bad in bad_inputs.items():
        with pytest.raises(JobInputError) as caught:
            w.add_job("job-a", bad)
        errors[source] = caught.value
        assert caught.value.source == source
        assert str(caught.value).startswith(f"{source}: ")
        assert w.engine.jobs == {}
    assert f"{rows}:2: invalid JSON" in str(errors["dataset"])
    assert "adapter_config.json" in str(errors["init_from"])
    assert "lr_scheduler_type 'bogus'" in str(errors["training"])


def test_job_input_error_pickles_with_its_fields() -> None:
    error = JobInputError("job-a", "dataset", "rows.jsonl:2: invalid JSON")
    back = pickle.loads(pickle.dumps(error))
    assert (back.job, back.source, back.reason) == (
        "job-a",
        "dataset",
        "rows.jsonl:2: invalid JSON",
    )
    assert str(back) == str(error) == "dataset: rows.jsonl:2: invalid JSON"


def test_carpools_own_errors_are_not_the_jobs(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    w = worker(tiny_base, tmp_path)
    w.add_job("job-a", config(datasets))
    with pytest.raises(ValueError, match="already on this engine") as caught:
        w.add_job("job-a", config(datasets))  # the controller's bug, not the job's input
    assert not isinstance(caught.value, JobInputError)


class Rank:
    """One rank's view of membership, as EngineWorker keeps it."""

    def __init__(self, add_error: Exception | None = None, remove_error: bool = False) -> None:
        self.jobs: set[str] = set()
        self.add_error, self.remove_error = add_error, remove_error

    def add_job(self, job_id: str) -> JobAdmitted:
        if self.add_error:
            raise self.add_error
        self.jobs.add(job_id)
        return JobAdmitted(0)

    def remove_job(self, job_id: str) -> None:
        if self.remove_error:
            raise RuntimeError("rank lost")
        self.jobs.discard(job_id)  # absent: nothing to do, like EngineWorker.remove_job


def admit(ranks: list[Rank], job_id: str) -> JobAdmitted:
    return admit_on_all_ranks(
        lambda: [rank.add_job(job_id) for rank in ranks][0],
        [lambda rank=rank: rank.remove_job(job_id) for rank in ranks],
    )


def test_job_that_fails_to_start_on_one_rank_is_removed_from_every_rank() -> None:
    ranks = [Rank(), Rank(), Rank(add_error=ValueError("bad rows")), Rank()]
    ranks[0].jobs.add("other")
    with pytest.raises(ValueError, match="bad rows"):  # the rank's own error, unchanged
        admit(ranks, "job-a")
    assert [rank.jobs for rank in ranks] == [{"other"}, set(), set(), set()]


def test_a_rank_that_cannot_remove_the_job_does_not_keep_it_on_the_others() -> None:
    ranks = [Rank(remove_error=True), Rank(), Rank(add_error=ValueError("bad rows"))]
    with pytest.raises(ValueError, match="bad rows"):  # not the failed removal's error
        admit(ranks, "job-a")
    assert ranks[1].jobs == set()


class RankLost(RuntimeError):
    """A stand-in for the group's lost-rank error (`GroupFailedError` on Ray)."""


def test_a_lost_rank_fails_the_admission_without_removes() -> None:
    """Seen as a hung suite: rank 0 died in the rendezvous, rank 1 waited for it there,
    and the remove sent to rank 1 never returned. The group is shut down whole instead."""

    def add() -> JobAdmitted:
        raise RankLost("rank 0 died")

    removed = []
    with pytest.raises(RankLost):
        removes = [lambda: removed.append(0), lambda: removed.append(1)]
        admit_on_all_ranks(add, removes, group_lost=(RankLost,))
    assert removed == []
    with pytest.raises(RankLost):  # any other error: every rank is asked to remove the job
        admit_on_all_ranks(add, removes)
    assert removed == [0, 1]


def test_job_admitted_on_every_rank_stays() -> None:
    ranks = [Rank(), Rank()]
    assert admit(ranks, "job-a") == JobAdmitted(0)
    assert [rank.jobs for rank in ranks] == [{"job-a"}, {"job-a"}]


def test_a_uri_store_leaves_no_scratch_copy_of_a_job_behind(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Checkpoints for an object store are written to scratch, then uploaded: a finished,
    cancelled or resumed job's local copies go once the store holds them."""
    w = worker(tiny_base, tmp_path, storage_root="mock://bucket/carpool")
    scratch = tmp_path / "scratch" / "g1"
    w.add_job("job-a", config(datasets, steps=3))
    w.add_job("job-b", config(datasets, steps=3))
    (a, _) = w.run_round()
    assert (scratch / "checkpoints" / "job-a").is_dir()  # written here, then uploaded

    w.remove_job("job-b", checkpoint=False)  # cancelled
    assert not (scratch / "checkpoints" / "job-b").exists()
    w.remove_job("job-a", checkpoint=True)  # preempted: it will be back
    w.add_job("job-a", config(datasets, steps=3), a.checkpoint)
    assert not (scratch / "resume" / "job-a").exists()  # its state is in memory
    results = w.run_round() + w.run_round()
    assert results[-1].done and w.store.exists(results[-1].adapter)
    assert not (scratch / "checkpoints" / "job-a").exists()
    assert not [p for p in scratch.rglob("*") if p.is_file()]
