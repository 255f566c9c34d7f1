"""The shipped cluster files parse and refer only to metrics carpool exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import orchestrator.ray_runtime as ray_runtime

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def exported_metric_names() -> set[str]:
    """Names passed to ray.util.metrics in the runtime, as Prometheus shows them."""
    source = Path(ray_runtime.__file__).read_text()
    names = re.findall(r'ray_metrics\.(?:Gauge|Counter|Histogram)\(\s*"([a-z_]+)"', source)
    return {f"ray_{n}" for n in names}


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((CLUSTER / "grafana_dashboard.json").read_text())
    assert dashboard["panels"], "dashboard has no panels"
    exported = exported_metric_names()
    assert "ray_carpool_job_loss" in exported
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"ray_carpool_[a-z_]+", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queried |= set(re.findall(r"ray_carpool_[a-z_]+", variable["definition"]))
    assert queried and queried <= exported, queried - exported
    # Every exported metric is on the dashboard.
    assert exported <= queried, exported - queried
