"""The fused multi-job LoRA engine: one frozen base, many jobs, one pass per micro-batch.

Usable in-process without Ray; a worker actor is a thin shell around it.

`Engine.train_round` gives every active job exactly one optimizer step: it
gathers each job's next `batch_size` rows, packs all of them into fused
micro-batches, runs forward/backward once per micro-batch with every row
routed through its own job's adapter, then steps each job's optimizer. The
bookkeeping of a round (evaluations, checkpoints, finishing jobs) is
`carpool.workers.training.rounds.run_round`'s.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from carpool.workers.bank.adapter_bank import AdapterBank
from carpool.workers.base.base_model import default_device, default_dtype, load_base, load_tokenizer
from carpool.workers.base.gradient_checkpointing import enable_gradient_checkpointing
from carpool.workers.base.quantization import describe
from carpool.workers.data.batch_layout import check_batch_layout
from carpool.workers.data.dataset import Record, TokenizedDataset
from carpool.workers.data.dataset_cache import DatasetCache
from carpool.workers.data.fused_batch import (
    StepRow,
    collate,
    mismatched_step_rows,
    plan_micro_batches,
    step_rows,
)
from carpool.workers.data.row_attention import packed_unsupported, use_row_attention
from carpool.workers.data.segment import Segment
from carpool.workers.distributed.data_parallel import DataParallel, reduce_metric_sums
from carpool.workers.distributed.zero3 import dummy_row, load_base_zero3, pad_micro_batches
from carpool.workers.losses.chunked_loss import supports_chunked_loss
from carpool.workers.losses.paired_terms import completion_logps, pair_terms, row_key
from carpool.workers.losses.position_losses import add_segment_losses, scaled, token_nll
from carpool.workers.losses.preference_losses import figure_names, step_figures
from carpool.workers.peft_files.peft_export import export_adapter
from carpool.workers.spec.job_spec import (
    DatasetSpec,
    JobInputError,
    JobSpec,
    QuantizationSpec,
)
from carpool.workers.spec.objective import (
    KtoObjective,
    PairObjective,
    is_preference,
    needs_reference,
)
from carpool.workers.training.checkpoint import latest_checkpoint, load_checkpoint
from carpool.workers.training.initial_adapters import initial_adapter
from carpool.workers.training.reference_tables import ReferenceTables
from carpool.workers.training.references import (
    ForwardSetup,
    References,
    RowLookup,
    reference_name,
)
from carpool.workers.training.training_job import StepReport, TrainingJob
from carpool.workers.variants.job_adapter import JobAdapter

log = logging.getLogger("carpool.engine")


def _figure_names(paired: dict[str, PairObjective]) -> dict[str, tuple[str, ...]]:
    return {name: figure_names(objective) for name, objective in paired.items()}


class Engine:
    """Trains any number of LoRA jobs on one base model loaded once."""

    def __init__(
        self,
        base_model: str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        micro_batch_tokens: int | None = None,
        trust_remote_code: bool = False,
        data_parallel: DataParallel | None = None,
        zero_stage: int = 0,
        offload_params: bool = False,
        zero_options: dict | None = None,
        gradient_checkpointing: bool = False,
        loss_chunk_tokens: int | None = None,
        adapter_math: str = "auto",
        batch_layout: str = "auto",
        quantization: QuantizationSpec | None = None,
        reference_cache_dir: Path | None = None,
    ) -> None:
        """`micro_batch_tokens` caps tokens per forward/backward (None: one per round);
        padded ones count in the padded layout.

        With `data_parallel`, this engine is one rank of a group: it trains its
        share of every job's rows and sums adapter gradients with the others.
        `zero_stage=3` also partitions the base across that group (DeepSpeed
        ZeRO-3, `offload_params` keeps the partitions on the host; `zero_options`
        go to DeepSpeed's `zero_optimization`); then every rank must call
        `train_round`, `evaluate` and `logits` together.

        `gradient_checkpointing` recomputes each decoder layer in the backward
        instead of keeping its activations: less memory, the same result.

        `loss_chunk_tokens` computes the loss through the frozen output layer
        that many tokens at a time, never holding the whole batch's logits
        (ignored, with a warning, where the model or ZeRO-3 does not allow it).

        `adapter_math` chooses how the bank computes the LoRA terms: `loop`,
        `bmm`, `grouped_mm` or `auto` (see `carpool.workers.bank.grouped_lora`).

        `batch_layout` lays a micro-batch's rows out `padded` or `packed` (see
        `carpool.workers.data.fused_batch`); `auto` packs where the model allows it.

        `quantization` loads the base in 4 bits (QLoRA); only jobs whose
        `base_quantization` equals it may join.

        `reference_cache_dir` keeps the reference log-probs of jobs with
        `precompute_ref_log_probs` (see `reference_tables`); None keeps them in memory.
        """
        if zero_stage not in (0, 3):
            raise ValueError(f"zero_stage must be 0 or 3, got {zero_stage}")
        if zero_stage == 3 and quantization is not None:
            # DeepSpeed partitions float parameters; bitsandbytes' packed 4-bit ones it cannot.
            raise ValueError("base_quantization cannot run with zero_stage=3: use zero_stage 0")
        if zero_stage == 3 and data_parallel is None:
            raise ValueError("zero_stage=3 partitions the base across a group: pass data_parallel")
        self.quantization = quantization
        self.base_model = base_model
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.micro_batch_tokens = micro_batch_tokens
        self.data_parallel = data_parallel
        self.zero_stage = zero_stage
        self._zero3 = None  # what must stay alive while the ZeRO-3 base is in use
        if zero_stage == 3:
            self.base, self._zero3 = load_base_zero3(
                base_model,
                dtype=self.dtype,
                device=self.device,
                offload_params=offload_params,
                trust_remote_code=trust_remote_code,
                zero_options=zero_options,
                group=data_parallel.group,
            )
        else:
            self.base = load_base(
                base_model,
                device=self.device,
                dtype=self.dtype,
                trust_remote_code=trust_remote_code,
                quantization=quantization,
            )
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.base)
        self.loss_chunk_tokens = self._check_loss_chunking(loss_chunk_tokens)
        self.packed = self._choose_layout(check_batch_layout(batch_layout))
        self.tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
        self._datasets = DatasetCache(self.tokenizer)  # jobs sharing a file tokenize it once
        self.bank = AdapterBank(self.base, adapter_math=adapter_math)
        self.jobs: dict[str, TrainingJob] = {}
        setup = ForwardSetup(
            base=self.base,
            bank=self.bank,
            pad_token_id=self.tokenizer.pad_token_id,
            device=self.device,
            packed=self.packed,
            micro_batch_tokens=micro_batch_tokens,
            loss_chunk_tokens=self.loss_chunk_tokens,
            zero_stage=zero_stage,
            data_parallel=data_parallel,
            base_identity=(base_model, quantization, self.dtype),
        )
        self.references = References(setup, ReferenceTables(reference_cache_dir))

    # -- jobs joining and leaving ---------------------------------------------------------
    def add_job(
        self,
        config: JobSpec,
        *,
        dataset: TokenizedDataset | None = None,
        resume_from: str | Path | None = None,
    ) -> TrainingJob:
        """Admit a job between rounds. `resume_from` is a checkpoint dir or a root of them.

        Raises JobInputError when the job's own data, adapter or settings cannot be used.
        """
        if config.name in self.jobs:
            raise ValueError(f"a job named {config.name!r} is already on this engine")
        if config.base_quantization != self.quantization:
            raise ValueError(
                f"job {config.name!r} asks for base_quantization "
                f"{describe(config.base_quantization)}; this engine's base has "
                f"{describe(self.quantization)}"
            )
        if dataset is None:
            with _job_input(config.name, "dataset"):
                dataset = self._load(config.dataset, config)
        eval_dataset = None
        if config.eval_dataset is not None:
            with _job_input(config.name, "eval_dataset"):
                eval_dataset = self._load(config.eval_dataset, config)
        with _job_input(config.name, "init_from" if config.adapter.init_from else "adapter"):
            adapter = self._initial_adapter(config)
        with _job_input(config.name, "training"):
            job = TrainingJob(config, dataset, adapter, eval_dataset)
        if resume_from is not None:
            path = Path(resume_from)
            checkpoint = path if (path / "meta.json").exists() else latest_checkpoint(path)
            if checkpoint is not None:
                load_checkpoint(job, checkpoint)
        self.bank.add(job.adapter)
        if needs_reference(config.objective):
            self.references.add(job, self._reference_adapter(config))
        self.jobs[config.name] = job
        return job

    def _reference_adapter(self, config: JobSpec) -> JobAdapter:
        """A DPO job's reference policy: for a fresh adapter one with no modules (its rows
        see the base alone); for a job started from an adapter, that adapter (frozen by
        `References.add`)."""
        if config.adapter.init_from is None:
            return JobAdapter.without_modules(reference_name(config.name))
        with _job_input(config.name, "init_from"):
            return self._initial_adapter(config)

    def _load(self, data: DatasetSpec, config: JobSpec) -> TokenizedDataset:
        return self._datasets.load(Path(data.path), data.format, config.training.max_seq_length)

    def _initial_adapter(self, config: JobSpec) -> JobAdapter:
        return initial_adapter(self.base, config, zero_stage=self.zero_stage)

    def remove_job(self, name: str) -> TrainingJob:
        """Take a job off the engine; the others are untouched."""
        job = self.jobs.pop(name)
        self.bank.remove(name)
        self.references.remove(name)
        return job

    @property
    def reference_passes(self) -> int:
        """No-grad forwards run for DPO jobs' reference log-probs."""
        return self.references.passes

    def active_jobs(self) -> list[TrainingJob]:
        return [j for j in self.jobs.values() if j.active]

    # -- training -------------------------------------------------------------------------
    def train_round(self) -> dict[str, StepReport]:
        """One optimizer step for every active job; returns each job's report."""
        jobs = self.active_jobs()
        if not jobs:
            return {}
        rows_by_job = {j.name: j.next_rows() for j in jobs}
        own_values = {j.name: j.start_step() for j in jobs}  # DyLoRA draws its rank here
        all_rows = [
            r
            for name, (rows, ids) in rows_by_job.items()
            for r in step_rows(name, rows, ids, self.jobs[name].config.objective)
        ]
        paired = {j.name: j.config.objective for j in jobs if is_preference(j.config.objective)}
        losses: dict[str, float] = defaultdict(float)
        pair_metrics: dict[str, dict[str, float]] = {n: defaultdict(float) for n in paired}
        tables = self.references.lookups({n: self.jobs[n] for n in paired}, "train")
        kl = self._kl_estimates(rows_by_job, paired)
        for micro in self._micro_batches(all_rows, filler_job=min(j.name for j in jobs)):
            self._micro_batch(micro, paired, tables, kl, losses, pair_metrics, backward=True)
        dp = self.data_parallel
        if dp:
            jobs = sorted(jobs, key=lambda j: j.name)  # the same order on every rank
            dp.reduce_gradients([j.adapter for j in jobs])
            losses = dp.reduce_losses([j.name for j in jobs], losses)
            pair_metrics = reduce_metric_sums(dp, pair_metrics, _figure_names(paired))
        for j in jobs:
            # After the gradients' reduction: every rank adds the same term once.
            penalty = j.regularizer()
            if penalty is not None:
                penalty.backward()
                losses[j.name] += float(penalty.detach())
        for j in jobs:  # every backward done: full ranks again, for evaluation and export
            j.end_step()
        # One host sync for every job's gradient check and norm, not one per job.
        stats = torch.stack([j.gradient_stats() for j in jobs]).tolist()
        reports = {}
        for j, (finite, grad_norm) in zip(jobs, stats, strict=True):
            # A job that diverged fails alone: its rows touched only its own adapter.
            reason = j.non_finite(losses[j.name], grads_finite=bool(finite))
            if reason is not None:
                j.fail(reason)
                reports[j.name] = StepReport(
                    job=j.name,
                    step=j.step,
                    total_steps=j.total_steps,
                    loss=losses[j.name],
                    tokens=0,
                    learning_rate=j.learning_rate,
                    grad_norm=grad_norm,
                    error=reason,
                )
                continue
            rows = rows_by_job[j.name][0]
            metrics = {}
            if j.name in paired:
                metrics = step_figures(paired[j.name], pair_metrics[j.name], len(rows))
            reports[j.name] = j.finish_step(
                losses[j.name], rows, grad_norm, metrics, own_values[j.name]
            )
        return reports

    @torch.no_grad()
    def evaluate(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Each job's mean cross-entropy over its eval rows' trainable tokens; for a
        preference job, its objective's mean loss over its eval pairs (and TRL's eval
        figures, `eval_rewards/accuracies` and the rest, in the job's `eval_metrics`).

        Fused like a training round (every job's eval rows share micro-batches,
        each through its own adapter), without dropout or gradients. Jobs without
        an eval dataset are skipped; `None` means every job. In a group, every
        rank must call this with the same jobs: the losses are summed across ranks.
        """
        chosen = sorted(self.jobs) if names is None else sorted(names)
        jobs = [self.jobs[n] for n in chosen if self.jobs[n].eval_dataset is not None]
        if not jobs:
            return {}
        rows = [
            row
            for j in jobs
            for row in step_rows(
                j.name, j.eval_dataset.rows, range(len(j.eval_dataset.rows)), j.config.objective
            )
        ]
        paired = {j.name: j.config.objective for j in jobs if is_preference(j.config.objective)}
        losses: dict[str, float] = defaultdict(float)
        pair_metrics: dict[str, dict[str, float]] = {n: defaultdict(float) for n in paired}
        tables = self.references.lookups({n: self.jobs[n] for n in paired}, "eval")
        # KTO's KL estimate of an evaluation is over the whole eval set, as one step.
        eval_records = {
            j.name: (j.eval_dataset.rows, range(len(j.eval_dataset.rows))) for j in jobs
        }
        kl = self._kl_estimates(eval_records, paired)
        for micro in self._micro_batches(rows, filler_job=jobs[0].name):
            self._micro_batch(micro, paired, tables, kl, losses, pair_metrics, backward=False)
        if self.data_parallel:
            losses = self.data_parallel.reduce_losses([j.name for j in jobs], losses)
            pair_metrics = reduce_metric_sums(
                self.data_parallel, pair_metrics, _figure_names(paired)
            )
        for name, sums in pair_metrics.items():  # TRL's eval names: eval_rewards/accuracies, ...
            records = len(self.jobs[name].eval_dataset.rows)
            figures = step_figures(paired[name], sums, records)
            self.jobs[name].eval_metrics = {f"eval_{k}": v for k, v in figures.items()}
        return {j.name: losses[j.name] for j in jobs}

    def _micro_batch(
        self,
        rows: list[StepRow],
        paired: dict[str, PairObjective],
        tables: Mapping[str, RowLookup],
        kl: Mapping[str, float],
        losses: dict[str, float],
        pair_metrics: dict[str, dict[str, float]],
        *,
        backward: bool,
    ) -> None:
        """One forward (and `backward`) over a micro-batch: the supervised rows' token loss
        and the preference pairs' loss against their shared reference pass, each job's share
        added to `losses` and its pair figures to `pair_metrics`."""
        batch = collate(rows, self.tokenizer.pad_token_id, self.device, self.packed)
        reference = self.references.logps(batch, paired, tables)
        # Routed through the backward too: checkpointed layers rerun forward there.
        with self.bank.route(batch.segments, packed=batch.packed):
            nll = token_nll(self.base, batch, self.loss_chunk_tokens)
            token_loss = scaled(nll, batch)
            pair_loss, pair_losses, sums = pair_terms(batch, nll, reference, paired, kl)
            if backward:
                loss = token_loss.sum()
                (loss if pair_loss is None else loss + pair_loss).backward()
        add_segment_losses(losses, batch, token_loss)
        for name, value in pair_losses.items():
            losses[name] += value
        for name, job_sums in sums.items():
            for metric, value in job_sums.items():
                pair_metrics[name][metric] += value

    def _kl_estimates(
        self,
        records: Mapping[str, tuple[Sequence[Record], Sequence[int]]],
        paired: Mapping[str, PairObjective],
    ) -> dict[str, float]:
        """Each KTO job's KL estimate for its step (`records`): the mean over the step's
        mismatched rows of the policy's minus the reference's log-prob, no graph, at least
        0 (TRL's). Over the whole step, in no-grad micro-batches of their own, so it does not
        depend on how the step's rows are split."""
        kto = sorted(n for n in records if isinstance(paired.get(n), KtoObjective))
        if not kto:
            return {}
        rows = [r for n in kto for r in mismatched_step_rows(n, *records[n])]
        sums: dict[str, float] = defaultdict(float)
        for micro in self._micro_batches(rows, filler_job=kto[0]):
            batch = collate(micro, self.tokenizer.pad_token_id, self.device, self.packed)
            reference = self.references.logps(batch, paired, {})
            with torch.no_grad(), self.bank.route(batch.segments, packed=batch.packed):
                policy = completion_logps(
                    batch, token_nll(self.base, batch, self.loss_chunk_tokens)
                )
            for row, value in zip(batch.rows, policy.tolist(), strict=True):
                if row.pair is not None:  # not a ZeRO-3 filler
                    sums[row.job] += value - reference[row_key(row)]
        if self.data_parallel:
            sums = self.data_parallel.reduce_losses(kto, sums)
        return {n: max(0.0, sums[n] / len(records[n][0])) for n in kto}

    def _micro_batches(self, rows: list[StepRow], filler_job: str) -> list[list[StepRow]]:
        """This rank's share of `rows`, packed into micro-batches."""
        dp = self.data_parallel
        micro_batches = plan_micro_batches(
            dp.shard(rows) if dp else rows, self.micro_batch_tokens, self.packed
        )
        if self.zero_stage == 3:
            # ZeRO-3 gathers are collectives: every rank runs as many passes as the busiest,
            # the extra ones over a zero-weight row of `filler_job`.
            filler = dummy_row(filler_job, self.tokenizer.pad_token_id)
            micro_batches = pad_micro_batches(micro_batches, dp, filler)
        return micro_batches

    def _choose_layout(self, setting: str) -> bool:
        """Whether micro-batches are packed: `packed` or `auto` where the model allows it."""
        if setting == "padded":
            return False
        reason = packed_unsupported(self.base)
        if reason is not None:
            message = f"batch_layout {setting} keeps padded rows for {self.base_model}: {reason}"
            if setting == "packed":
                log.warning("%s", message)
            else:
                log.info("%s", message)
            return False
        use_row_attention(self.base)
        return True

    def _check_loss_chunking(self, chunk_tokens: int | None) -> int | None:
        if chunk_tokens is None:
            return None
        if chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be at least 1, got {chunk_tokens}")
        reason = (
            "ZeRO-3 partitions the output layer" if self.zero_stage == 3 else None
        ) or supports_chunked_loss(self.base)
        if reason is not None:
            log.warning("loss_chunk_tokens ignored for %s: %s", self.base_model, reason)
            return None
        return chunk_tokens

    # -- outputs --------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, name: str, input_ids: torch.Tensor) -> torch.Tensor:
        """The base's logits with every row through job `name`'s adapter (no dropout)."""
        input_ids = input_ids.to(self.device)
        seg = Segment(name, 0, input_ids.shape[0], tuple(range(input_ids.shape[0])))
        with self.bank.route([seg]):
            return self.base(input_ids=input_ids, use_cache=False).logits

    def export(self, name: str, out_dir: str | Path) -> Path:
        """Write job `name`'s adapter as a PEFT adapter directory."""
        job = self.jobs[name]
        return export_adapter(
            job.adapter,
            out_dir,
            base_model=job.config.base_model,
            base_quantization=job.config.base_quantization,
        )


@contextmanager
def _job_input(job: str, source: str) -> Iterator[None]:
    """A ValueError while reading one of the job's own inputs is the job's fault.

    DatasetError and AdapterFormatError are ValueErrors too. Errors of carpool's
    own making (its checkpoints, a job added twice) stay outside these blocks.
    """
    try:
        yield
    except ValueError as e:
        raise JobInputError(job, source, str(e)) from e
