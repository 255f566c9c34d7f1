"""QLoRA through the queue: jobs of another quantization never share its group."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.cluster import assert_same_adapter, carpool_cluster, engine_result, write_job

# float32 compute keeps the comparison with the engine exact on CPU.
NF4 = {
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "float32",
}


@pytest.mark.integration
def test_a_4bit_job_through_the_queue_equals_the_engine_alone(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """The Ray path: a 4-bit job and a full-precision one on the same base, queued together,
    run in groups of their own; the 4-bit one's adapter is the engine's alone."""
    four_bit = write_job(tmp_path / "q4.yaml", "q4", tiny_base, datasets["text"], 4)
    raw = yaml.safe_load(four_bit.read_text())
    raw["base_quantization"] = NF4
    four_bit.write_text(yaml.safe_dump(raw))
    plain = write_job(tmp_path / "fp.yaml", "fp", tiny_base, datasets["text"], 4)
    with carpool_cluster(tmp_path, shared_ray_head, max_groups=2) as client:
        ids = client.submit([four_bit, plain])
        assert client.wait(ids, timeout=300) == dict.fromkeys(ids, "succeeded")
        started = [next(line for line in client.logs(i) if "started in group" in line) for i in ids]
        groups = {line.split("started in group ")[1].split()[0] for line in started}
        assert len(groups) == 2  # (base, quantization) is the key that groups jobs
        assert_same_adapter(client.fetch(ids[0], tmp_path / "q4"), engine_result(four_bit))
