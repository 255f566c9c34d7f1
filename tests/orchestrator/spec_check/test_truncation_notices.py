"""What admitting a job tells its log (the worker shell and `carpool train` both say it)."""

from __future__ import annotations

from pathlib import Path

from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import changed, job


def test_truncated_rows_are_reported_per_dataset(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    long_rows = job("cut", tiny_base, datasets["messages"], AdapterSpec(r=2), max_seq_length=12)
    long_rows = changed(long_rows, eval_dataset=DatasetSpec(path=datasets["text"]))
    fits = job("whole", tiny_base, datasets["text"], AdapterSpec(r=2), max_seq_length=512)
    cut = engine.add_job(long_rows)
    notices = cut.truncation_notices()
    assert cut.dataset.truncated_rows > 0 and cut.eval_dataset.truncated_rows > 0
    assert notices == (
        f"dataset: {cut.dataset.truncated_rows} of 40 rows truncated to max_seq_length=12",
        f"eval_dataset: {cut.eval_dataset.truncated_rows} of 40 rows truncated "
        "to max_seq_length=12",
    )
    assert engine.add_job(fits).truncation_notices() == ()
