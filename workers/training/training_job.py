"""One job's training state: data position, optimizer, schedule, progress.

Per-job step accounting: each job takes its own `batch_size` rows per step,
keeps its own AdamW state and schedule, and steps only its own parameters,
whatever else shares the fused batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from carpool.workers.data.dataset import Record, TokenizedDataset
from carpool.workers.data.dataset_rows import TokenizedRow
from carpool.workers.spec.job_spec import JobSpec
from carpool.workers.training.lr_schedule import lr_multiplier
from carpool.workers.training.training_history import StepRecord, TrainingHistory, trainer_state
from carpool.workers.variants.adalora import orthogonality_loss
from carpool.workers.variants.dylora import drawn_rank, set_rank
from carpool.workers.variants.job_adapter import JobAdapter
from carpool.workers.variants.sora import (
    gate_parameters,
    kept_rank_share,
    soft_threshold,
    sparsity_penalty,
)
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True, kw_only=True)
class StepReport:
    """What one optimizer step of one job produced (for progress and metrics)."""

    job: str
    step: int  # steps done after this one
    total_steps: int
    loss: float  # mean cross-entropy over the step's trainable tokens
    tokens: int  # real tokens the step processed
    learning_rate: float  # of the step (the first parameter group's, as HF reports it)
    grad_norm: float  # L2 norm of the job's adapter gradients, before any clipping
    error: str | None = None  # the job failed in this step (e.g. its loss became NaN)
    # The objective's own figures, by TRL's names (a preference job's `rewards/margins`, ...).
    metrics: Mapping[str, float] = field(default_factory=dict)


def record_tokens(record: Record) -> int:
    """A record's real tokens: its row's, or both rows' of a pair."""
    if isinstance(record, TokenizedRow):
        return len(record.input_ids)
    return sum(len(r.input_ids) for r in record.rows)


def build_optimizer(adapter: JobAdapter, config: JobSpec) -> torch.optim.AdamW:
    """AdamW over the job's trainable adapter weights; LoRA+ gives B its own LR.

    DoRA's magnitudes go with B, as PEFT's `create_loraplus_optimizer` puts every
    1-d parameter in B's group.
    """
    t = config.training
    if adapter.peft_type in ("VERA", "ADALORA"):  # LoRA+ is a LoRA option: one group
        a_params, b_params = [], adapter.parameters()
    elif adapter.peft_type == "SORA":  # the gates: a group of their own, below
        a_params = [w.lora_A for w in adapter.modules.values()]
        b_params = [w.lora_B for w in adapter.modules.values()]
    else:
        a_params = [w.lora_A for w in adapter.modules.values() if w.lora_A.requires_grad]
        b_params = [w.lora_B for w in adapter.modules.values()]
        b_params += [w.magnitude for w in adapter.modules.values() if w.magnitude is not None]
    ratio = config.adapter.loraplus_lr_ratio
    if ratio is None:
        groups = [{"params": a_params + b_params}]
    else:
        groups = [{"params": b_params, "lr": t.learning_rate * ratio}]
        if a_params:
            groups.insert(0, {"params": a_params})
    if adapter.peft_type == "SORA":  # followed by soft_threshold at each step
        lr = config.adapter.sparse_lr or t.learning_rate
        groups.append({"params": gate_parameters(adapter), "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
        # One multi-tensor update per job instead of ~12 ops per tensor: measured 1.45-1.6x
        # faster on CPU at K=32-64 (BENCHMARKS.md), the default on CUDA already.
        foreach=True,
    )


class TrainingJob:
    def __init__(
        self,
        config: JobSpec,
        dataset: TokenizedDataset,
        adapter: JobAdapter,
        eval_dataset: TokenizedDataset | None = None,
    ) -> None:
        for data in (dataset, eval_dataset):
            if data is not None and not data.rows:
                raise ValueError(f"job {config.name!r}: dataset {data.source} has no rows")
        self.config = config
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.adapter = adapter
        self.name = config.name
        t = config.training
        self.total_steps = t.total_steps(len(dataset.rows))
        self.optimizer = build_optimizer(adapter, config)
        self.scheduler = LambdaLR(
            self.optimizer, lr_multiplier(t.lr_scheduler_type, t.warmup_steps, self.total_steps)
        )
        self.step = 0
        self.rows_consumed = 0  # position in the row stream, across epochs
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.error: str | None = None  # set when the job failed of its own fault
        self.history = TrainingHistory(t.logging_steps, self.total_steps)
        # A preference job's figures of its last evaluation (TRL's `eval_rewards/...`).
        self.eval_metrics: dict[str, float] = {}
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def active(self) -> bool:
        return not self.done and self.error is None

    @property
    def eval_due(self) -> bool:
        """Whether the step just finished ends with an evaluation."""
        every = self.config.training.eval_steps
        if self.eval_dataset is None or self.error is not None or self.step == 0:
            return False
        return self.done or (every is not None and self.step % every == 0)

    def truncation_notices(self) -> tuple[str, ...]:
        """One line per dataset whose rows were cut to max_seq_length, for the job's log."""
        limit = self.config.training.max_seq_length
        datasets = (("dataset", self.dataset), ("eval_dataset", self.eval_dataset))
        truncated = tuple(
            f"{what}: {data.truncated_rows} of {len(data.rows)} rows truncated "
            f"to max_seq_length={limit}"
            for what, data in datasets
            if data is not None and data.truncated_rows
        )
        dropped = tuple(
            f"{what}: {data.dropped_rows} records dropped: their prompt leaves no room for a "
            f"completion at max_seq_length={limit}"
            for what, data in datasets
            if data is not None and data.dropped_rows
        )
        return truncated + dropped

    @property
    def epoch(self) -> float:
        """Epochs done, fractional (the Trainer's `epoch`): rows consumed over rows."""
        return self.rows_consumed / len(self.dataset.rows)

    def record_eval(self, eval_loss: float) -> None:
        """Keep an evaluation of the adapter after the current step in the history."""
        self.history.record_eval(self.step, self.epoch, eval_loss, self.eval_metrics)

    def trainer_state(self) -> dict:
        """HF's `trainer_state.json` fields for the job as it is now."""
        t = self.config.training
        return trainer_state(
            self.history.entries,
            global_step=self.step,
            max_steps=self.total_steps,
            epoch=self.epoch,
            logging_steps=t.logging_steps,
            eval_steps=t.eval_steps,
            save_steps=t.save_steps,
            train_batch_size=t.batch_size,
            num_input_tokens_seen=self.tokens_seen,
        )

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def gradient_stats(self) -> torch.Tensor:
        """[1.0 if every gradient is finite else 0.0, L2 norm of the gradients], float32.

        Left on the device: the engine reads every job's pair in one host sync.
        """
        grads = [p.grad for p in self.adapter.parameters() if p.grad is not None]
        if not grads:
            return torch.tensor([1.0, 0.0], device=self.adapter.parameters()[0].device)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return torch.stack([finite.float(), norm.float()])

    def non_finite(self, loss: float, grads_finite: bool) -> str | None:
        """Why this step must not be applied (a NaN/inf loss or gradient), or None."""
        if not math.isfinite(loss):
            return f"loss is {loss} at step {self.step + 1}"
        if not grads_finite:
            return f"non-finite gradient at step {self.step + 1}"
        return None

    def fail(self, reason: str) -> None:
        """Stop this job; its update is dropped, the others are untouched."""
        self.error = reason
        self.optimizer.zero_grad(set_to_none=True)

    # -- data -------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        """Row order of an epoch: file order, or a permutation seeded by (seed, epoch)."""
        if epoch != self._order_epoch:
            n = len(self.dataset.rows)
            if self.config.training.shuffle:
                key = f"{self.config.training.seed}:{epoch}".encode()
                seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
                gen = torch.Generator().manual_seed(seed)
                self._order = torch.randperm(n, generator=gen).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def dataset_index(self, stream_index: int) -> int:
        """Which of the dataset's records sits at `stream_index` of the job's record stream."""
        n = len(self.dataset.rows)
        return self._epoch_order(stream_index // n)[stream_index % n]

    def row_at(self, stream_index: int) -> Record:
        return self.dataset.rows[self.dataset_index(stream_index)]

    def next_rows(self) -> tuple[list[Record], list[int]]:
        """The records (rows, or pairs) of the job's next optimizer step and their stream
        positions."""
        count = self.config.training.rows_in_step(self.step, len(self.dataset.rows))
        ids = list(range(self.rows_consumed, self.rows_consumed + count))
        return [self.row_at(i) for i in ids], ids

    # -- stepping ---------------------------------------------------------------------
    def regularizer(self) -> torch.Tensor | None:
        """The step's loss term on the adapter's weights alone (AdaLoRA's orthogonality
        penalty, as PEFT adds it to the loss while training; SoRA's sparsity penalty), or
        None."""
        if self.adapter.peft_type == "SORA":
            return sparsity_penalty(self.adapter, self.config.adapter.sparse_lambda)
        allocator = self.adapter.adalora
        if allocator is None or allocator.schedule.orth_reg_weight == 0:
            return None
        return allocator.schedule.orth_reg_weight * orthogonality_loss(self.adapter.modules)

    def start_step(self) -> dict[str, float]:
        """Set the adapter up for this optimizer step; returns the step's own figures
        (DyLoRA: the rank it draws, `dylora_rank`)."""
        if self.adapter.peft_type != "DYLORA":
            return {}
        rank = drawn_rank(self.config.training.seed, self.step, self.adapter.r)
        set_rank(self.adapter.modules, rank)
        return {"dylora_rank": rank}

    def end_step(self) -> None:
        """The adapter back at its full rank (DyLoRA), for evaluation and export."""
        set_rank(self.adapter.modules, None)

    def finish_step(
        self,
        loss: float,
        rows: Sequence[Record],
        grad_norm: float,
        metrics: Mapping[str, float] | None = None,
        values: Mapping[str, float] | None = None,
    ) -> StepReport:
        """Clip, step AdamW and the schedule, and advance the data position.

        `grad_norm` is the gradients' norm (`gradient_stats`), reported as it is;
        `metrics` the objective's own figures of the step (logged as means since the last
        entry), `values` the step's own (`start_step`'s, logged as they are).
        """
        max_norm = self.config.training.max_grad_norm
        if max_norm is not None:
            trainable = [p for p in self.adapter.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, max_norm)  # as the PEFT reference clips
        lr = self.learning_rate
        self.optimizer.step()
        self.scheduler.step()
        values = dict(values or {})
        if self.adapter.peft_type == "SORA":  # the proximal step, after the gates' AdamW
            soft_threshold(self.adapter, self.config.adapter.sparse_lambda_2)
            values["sora_kept_rank"] = kept_rank_share(self.adapter)
        if self.adapter.adalora is not None:  # where PEFT's docs call it: before zero_grad
            self.adapter.adalora.update_and_allocate(self.adapter.modules, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.rows_consumed += len(rows)
        tokens = sum(record_tokens(r) for r in rows)
        self.tokens_seen += tokens
        self.last_loss = loss
        metrics = dict(metrics or {})
        self.history.record_step(
            StepRecord(
                step=self.step,
                loss=loss,
                learning_rate=lr,
                grad_norm=grad_norm,
                epoch=self.epoch,
                tokens_seen=self.tokens_seen,
                metrics=metrics,
                values=values,
            )
        )
        return StepReport(
            job=self.name,
            step=self.step,
            total_steps=self.total_steps,
            loss=loss,
            tokens=tokens,
            learning_rate=lr,
            grad_norm=grad_norm,
            metrics={**metrics, **values},
        )

    # -- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the adapter weights needed to resume exactly.

        No RNG state: shuffling and dropout draw from generators seeded by
        counters (epoch, row position), so the position is the whole state.
        """
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {
            "step": self.step,
            "rows_consumed": self.rows_consumed,
            "tokens_seen": self.tokens_seen,
            "last_loss": self.last_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler,
            "history": self.history.state_dict(),
            **({"adalora": self.adapter.adalora.state_dict()} if self.adapter.adalora else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.rows_consumed = int(state["rows_consumed"])
        self.tokens_seen = int(state["tokens_seen"])
        self.last_loss = state["last_loss"]
        if "history" in state:  # checkpoints from before histories resume with none
            self.history.load_state_dict(state["history"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.adapter.adalora is not None:
            self.adapter.adalora.load_state_dict(state["adalora"])
        self.scheduler.load_state_dict(
            {**state["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)}
        )
