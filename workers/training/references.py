"""The reference policies of an engine's DPO jobs: their row sets in the bank, the one
no-grad reference forward each micro-batch shares, and precomputed tables.

A DPO job's reference is the base alone for a fresh adapter (a row set with no modules)
or its starting adapter, frozen (TRL loads the same copy as "ref"). Its rows' reference
log-probs come, per micro-batch, from one forward without a graph over every such job's
rows, each routed to its job's reference; or, with `precompute_ref_log_probs`, from a
table computed once before the first step (`reference_tables`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from carpool.workers.bank.adapter_bank import AdapterBank
from carpool.workers.data.fused_batch import FusedBatch, collate
from carpool.workers.distributed.data_parallel import DataParallel
from carpool.workers.distributed.zero3 import dummy_row
from carpool.workers.losses.paired_terms import RowKey, reference_logps, reference_pass
from carpool.workers.losses.position_losses import token_nll
from carpool.workers.spec.objective import PairObjective, needs_reference
from carpool.workers.training.reference_tables import ReferenceTables, table_key
from carpool.workers.training.training_job import TrainingJob
from carpool.workers.variants.job_adapter import JobAdapter

_REFERENCE = "@reference"  # no job name holds "@": a DPO job's reference row set

RowLookup = Callable[[int, int], float]  # (record, side) -> a row's precomputed reference


def reference_name(job: str) -> str:
    return job + _REFERENCE


def job_of(reference: str) -> str:
    return reference.removesuffix(_REFERENCE)


@dataclass(frozen=True)
class ForwardSetup:
    """What a no-grad forward of the engine's base runs with."""

    base: torch.nn.Module
    bank: AdapterBank
    pad_token_id: int
    device: torch.device
    packed: bool
    micro_batch_tokens: int | None
    loss_chunk_tokens: int | None
    zero_stage: int
    data_parallel: DataParallel | None
    # The base's identity in a table's key: (base_model, quantization, dtype).
    base_identity: tuple


class References:
    """The DPO jobs' references of one engine, and the forwards they cost (`passes`)."""

    def __init__(self, setup: ForwardSetup, tables: ReferenceTables) -> None:
        self.setup = setup
        self.tables = tables
        self.passes = 0  # no-grad forwards for reference log-probs
        # (job, "train" or "eval") -> each dataset record's (chosen, rejected) reference
        self._precomputed: dict[tuple[str, str], list[list[float]]] = {}

    def add(self, job: TrainingJob, reference: JobAdapter) -> None:
        """`job`'s reference joins the bank as its row set (named `reference_name(job)`),
        and its tables are precomputed when the job asks."""
        reference.name = reference_name(job.name)
        for p in reference.parameters():
            p.requires_grad_(False)
        self.setup.bank.add(reference)
        if getattr(job.config.objective, "precompute_ref_log_probs", False):
            for split, dataset in (("train", job.dataset), ("eval", job.eval_dataset)):
                if dataset is not None:
                    self._precomputed[job.name, split] = self._table(job, dataset).tolist()

    def remove(self, name: str) -> None:
        if reference_name(name) in self.setup.bank.adapters:
            self.setup.bank.remove(reference_name(name))
        self._precomputed.pop((name, "train"), None)
        self._precomputed.pop((name, "eval"), None)

    def _table(self, job: TrainingJob, dataset) -> torch.Tensor:
        """The kept table of the same base, data and reference, or one pass over the data."""
        s = self.setup
        key = table_key(*s.base_identity, dataset, job.config)
        table = self.tables.get(key, len(dataset.rows))
        if s.data_parallel:  # all ranks use theirs, or all compute: gathers are collectives
            kept = s.data_parallel.reduce_losses(["kept"], {"kept": float(table is not None)})
            table = table if kept["kept"] == s.data_parallel.world_size else None
        if table is None:
            table, passes = reference_pass(
                s.base,
                s.bank,
                reference_name(job.name),
                dataset,
                pad_token_id=s.pad_token_id,
                device=s.device,
                packed=s.packed,
                micro_batch_tokens=s.micro_batch_tokens,
                loss_chunk_tokens=s.loss_chunk_tokens,
            )
            self.passes += passes
            self.tables.put(key, table)
        return table

    def lookups(self, jobs: Mapping[str, TrainingJob], split: str) -> dict[str, RowLookup]:
        """For each of `jobs` with a precomputed table, its rows' reference by (record,
        side): training records are stream positions, eval records dataset positions."""
        found: dict[str, RowLookup] = {}
        for name, job in jobs.items():
            table = self._precomputed.get((name, split))
            if table is not None:
                index = job.dataset_index if split == "train" else int
                found[name] = lambda record, side, t=table, at=index: t[at(record)][side]
        return found

    def logps(
        self,
        batch: FusedBatch,
        paired: Mapping[str, PairObjective],
        tables: Mapping[str, RowLookup],
    ) -> dict[RowKey, float]:
        """The reference log-probs of the micro-batch's DPO rows: from their job's table
        (`tables`), else from one forward without a graph for every other job's pairs at
        once. Under ZeRO-3 every rank runs that forward for every micro-batch while any job
        needs it (over a filler row where it has none): its gathers are collectives."""
        s = self.setup
        live = {n for n, objective in paired.items() if needs_reference(objective)} - set(tables)
        found = {
            (r.job, r.pair.record, r.pair.side): tables[r.job](r.pair.record, r.pair.side)
            for r in batch.rows
            if r.job in tables and r.pair is not None
        }
        rows = [
            replace(r, job=reference_name(r.job))
            for r in batch.rows
            if r.job in live and r.pair is not None
        ]
        if not rows and not (live and s.zero_stage == 3):
            return found
        if not rows:
            rows = [dummy_row(reference_name(min(live)), s.pad_token_id)]
        sub = collate(rows, s.pad_token_id, s.device, s.packed)
        self.passes += 1
        with torch.no_grad(), s.bank.route(sub.segments, packed=sub.packed):
            nll = token_nll(s.base, sub, s.loss_chunk_tokens)
        if rows[0].pair is None:
            return found
        for (ref, record, side), value in reference_logps(sub, nll).items():
            found[job_of(ref), record, side] = value
        return found
