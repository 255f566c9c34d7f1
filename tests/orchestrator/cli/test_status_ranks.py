"""`carpool status` under a DyLoRA or SoRA job: the rank its last step trained or kept."""

from __future__ import annotations

from carpool.orchestrator.cli.main import rank_lines


def test_a_dylora_or_sora_job_shows_its_last_rank_and_others_nothing() -> None:
    assert rank_lines({"dylora_rank": 3.0}) == ["dylora_rank 3: the rank its last step trained"]
    assert rank_lines({"sora_kept_rank": 0.75}) == [
        "sora_kept_rank 0.750: the share of rank components kept"
    ]
    assert rank_lines({"eval_loss": 1.0, "rewards/margins": 0.2}) == []
