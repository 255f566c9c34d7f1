"""The prompts file of `carpool generate`: one JSON object per line, checked before any model loads.

Each row is `{"prompt": "...", "adapter": NAME}` or `{"messages": [...], "adapter": NAME}`.
With `--all-adapters` every row goes through every adapter (its `adapter` is then
ignored); with a single adapter a row may leave `adapter` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carpool.workers.data.dataset import DatasetError, read_numbered_records


@dataclass(frozen=True)
class PromptRow:
    line: int
    record: dict[str, Any]  # the row's "prompt" or "messages"
    adapters: tuple[str, ...]  # the adapters it goes through, in the command's order

    @property
    def shown(self) -> Any:
        """The prompt as the output echoes it: the string, or the messages."""
        return self.record.get("prompt", self.record.get("messages"))


def read_prompts(path: Path, names: list[str], all_adapters: bool) -> list[PromptRow]:
    """Every row of the prompts file, each with the adapters it goes through.

    `names` are the command's adapters (and `base` with --include-base). Raises
    DatasetError naming the file and line of the first bad row.
    """
    rows = []
    for line, record in read_numbered_records(path):
        has_prompt, has_messages = "prompt" in record, "messages" in record
        if has_prompt == has_messages:
            raise DatasetError(path, 'each row needs "prompt" or "messages" (one of them)', line)
        prompt = {k: record[k] for k in ("prompt", "messages") if k in record}
        if all_adapters:
            rows.append(PromptRow(line, prompt, tuple(names)))
            continue
        adapter = record.get("adapter")
        if adapter is None and len(names) == 1:
            adapter = names[0]
        if adapter is None:
            raise DatasetError(
                path, 'no "adapter" in this row (name one, or pass --all-adapters)', line
            )
        if adapter not in names:
            raise DatasetError(path, f"adapter {adapter!r} is not one of: {', '.join(names)}", line)
        rows.append(PromptRow(line, prompt, (adapter,)))
    return rows
