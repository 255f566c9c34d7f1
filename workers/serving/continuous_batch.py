"""Continuous batching across adapters: rows of many adapters decode together, and a
new row joins the running batch between two steps instead of waiting for it to end.

The batch keeps one KV cache, left-padded so every row's next token is its last
column. A joining row is prefilled on its own (with the others joining at that step),
and its cache is merged in: the shorter of the two is padded on the left (masked
columns), the rows are concatenated and reordered so each adapter's rows are
contiguous, as the bank's segments need. A finished or cancelled row is dropped from
the cache, and columns no row uses any more are trimmed off the left. A row's tokens
therefore depend on its prompt, adapter and sampling only: padding is masked, and
positions are each row's own.

Caches whose layers are not plain growing key/value tensors (sliding-window or
recurrent layers) cannot be merged this way: on such a base a new row waits until
the running batch has finished (static batching), and `mergeable` says so.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from carpool.workers.after_training.fused_inference import (
    Sampling,
    TokenPicker,
    segments_by_adapter,
)
from carpool.workers.bank.adapter_bank import AdapterBank
from carpool.workers.variants.job_adapter import JobAdapter
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

FINISHED = None  # what `on_token` receives after a row's last token


@dataclass(eq=False)
class DecodeRow:
    """One request's row: its adapter, prompt and sampling, and where its tokens go.

    `on_token` is called from the decoding thread with each new token, then once with
    `FINISHED` (also after a cancel). It must not block.
    """

    adapter: str
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    on_token: Callable[[int | None], None]
    key: str = ""  # seeds sampling with the sampling seed and the adapter
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None  # "stop" (a stop token), "length", "cancelled"


def _is_mergeable(cache: object) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class ContinuousDecoder:
    """Decodes rows of any adapters in the bank, one token per row per `step()`.

    `submit` and `cancel` may be called from any thread; `step` (or `run`) from one.
    """

    def __init__(
        self,
        base: nn.Module,
        bank: AdapterBank,
        pad_token_id: int,
        stop_ids: set[int],
        device: torch.device,
        max_rows: int = 64,
    ) -> None:
        self.base, self.bank, self.device = base, bank, device
        self.pad_token_id, self.stop_ids, self.max_rows = pad_token_id, stop_ids, max_rows
        self.mergeable = True  # until a cache says otherwise
        self._pending: list[DecodeRow] = []
        self._wake = threading.Condition()
        # Held through a step: the bank's adapters change only between steps.
        self.between_steps = threading.Lock()
        self._retiring: set[str] = set()
        # The running batch: rows (grouped by adapter), their cache, mask, next
        # positions, the logits their next token is drawn from, and their pickers.
        self.rows: list[DecodeRow] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._next_position = torch.zeros((0, 1), dtype=torch.long, device=device)
        self._logits: torch.Tensor | None = None
        self._pickers: list[TokenPicker] = []
        # transformers 5 renamed a forward's `past_key_values` to `cache`.
        parameters = inspect.signature(base.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    # -- any thread ---------------------------------------------------------------------
    def submit(self, row: DecodeRow) -> None:
        with self._wake:
            self._pending.append(row)
            self._wake.notify()

    def cancel(self, row: DecodeRow) -> None:
        """Frees the row's place at the next step (a client that went away)."""
        row.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def busy(self) -> bool:
        """Rows running or waiting."""
        return bool(self.rows or self._pending)

    def add_adapter(self, adapter: JobAdapter) -> None:
        """Put an adapter in the bank between two steps (a retiring one is kept instead)."""
        with self.between_steps:
            if adapter.name in self.bank.adapters:
                self._retiring.discard(adapter.name)
                return
            self.bank.add(adapter)

    def retire(self, name: str) -> None:
        """Remove an adapter from the bank once no running or waiting row uses it."""
        with self.between_steps:
            self._retiring.add(name)
            self._remove_retired()

    def _remove_retired(self) -> None:
        with self._wake:
            used = {r.adapter for r in [*self.rows, *self._pending]}
        for name in [n for n in self._retiring if n not in used]:
            self._retiring.discard(name)
            if name in self.bank.adapters:
                self.bank.remove(name)

    # -- the decoding thread ------------------------------------------------------------
    def run(self, stopping: threading.Event) -> None:
        """Step while there are rows; sleep until one is submitted or `stopping` is set."""
        while not stopping.is_set():
            with self._wake:
                if not self.rows and not self._pending:
                    self._wake.wait(timeout=0.5)
                    continue
            self.step()

    def step(self) -> bool:
        """Admit waiting rows, give every running row its next token. False when idle."""
        with self.between_steps, torch.no_grad():
            running = self._step()
            if self._retiring:
                self._remove_retired()
            return running

    def _step(self) -> bool:
        self._drop([r for r in self.rows if r.cancelled], "cancelled")
        self._admit()
        if not self.rows:
            return False
        tokens = [pick(self._logits[i]) for i, pick in enumerate(self._pickers)]
        ended = []
        for row, token in zip(self.rows, tokens, strict=True):
            if token in self.stop_ids:
                row.finish_reason = "stop"
                ended.append(row)
                continue
            if not row.generated:
                row.first_token_at = time.monotonic()
            row.generated.append(token)
            row.on_token(token)
            if len(row.generated) >= row.sampling.max_new_tokens:
                row.finish_reason = "length"
                ended.append(row)
        keep = [i for i, r in enumerate(self.rows) if r not in ended]
        self._drop(ended, None)
        if self.rows:
            self._forward([tokens[i] for i in keep])
        return True

    # -- internals ----------------------------------------------------------------------
    def _forward(self, tokens: list[int]) -> None:
        """One token for every running row, appended to the cache."""
        n = len(self.rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones((n, 1))], dim=1)
        with self.bank.route(segments_by_adapter(self.rows)):
            out = self.base(
                input_ids=torch.tensor(tokens, device=self.device).view(n, 1),
                attention_mask=self._mask,
                position_ids=self._next_position,
                use_cache=True,
                **{self._cache_argument: self._cache},
            )
        self._cache = _returned_cache(out)
        self._logits = out.logits[:, -1].float()
        self._next_position = self._next_position + 1

    def _admit(self) -> None:
        with self._wake:
            room = self.max_rows - len(self.rows)
            if room <= 0 or not self._pending or (self.rows and not self.mergeable):
                return
            joining, self._pending = self._pending[:room], self._pending[room:]
        for row in joining:
            if row.cancelled:
                row.finish_reason = "cancelled"
                row.on_token(FINISHED)
        joining = sorted((r for r in joining if not r.cancelled), key=lambda r: r.adapter)
        if not joining:
            return
        now = time.monotonic()
        for row in joining:
            row.admitted_at = now
        cache, mask, logits = self._prefill(joining)
        self.mergeable = _is_mergeable(cache)
        positions = (mask.sum(-1, keepdim=True) - 1).clamp_min(0) + 1
        pickers = [TokenPicker(r.sampling, r.adapter, r.key, self.device) for r in joining]
        if not self.rows:
            self.rows, self._cache, self._mask = joining, cache, mask
            self._next_position, self._logits, self._pickers = positions, logits, pickers
            return
        self._merge(joining, cache, mask, positions, logits, pickers)

    def _prefill(self, rows: list[DecodeRow]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        n, longest = len(rows), max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(rows):  # left-padded: every row's next token is the last column
            input_ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with self.bank.route(segments_by_adapter(rows)):
            out = self.base(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_argument: DynamicCache(config=self.base.config)},
            )
        return _returned_cache(out), mask, out.logits[:, -1].float()

    def _merge(self, rows, cache, mask, positions, logits, pickers) -> None:
        """Join prefilled rows to the running batch: align lengths, concatenate, regroup."""
        length = max(self._mask.shape[1], mask.shape[1])
        for ours, theirs in zip(self._cache.layers, cache.layers, strict=True):
            ours.keys = torch.cat([_left_pad(ours.keys, length), _left_pad(theirs.keys, length)])
            ours.values = torch.cat(
                [_left_pad(ours.values, length), _left_pad(theirs.values, length)]
            )
        self._mask = torch.cat([_left_pad(self._mask, length), _left_pad(mask, length)])
        self._next_position = torch.cat([self._next_position, positions])
        self._logits = torch.cat([self._logits, logits])
        all_rows = [*self.rows, *rows]
        all_pickers = [*self._pickers, *pickers]
        order = sorted(range(len(all_rows)), key=lambda i: all_rows[i].adapter)  # stable
        self.rows = [all_rows[i] for i in order]
        self._pickers = [all_pickers[i] for i in order]
        self._select(torch.tensor(order, device=self.device))

    def _drop(self, rows: list[DecodeRow], reason: str | None) -> None:
        """Remove rows from the batch (telling each it finished) and trim unused columns."""
        if not rows:
            return
        for row in rows:
            row.finish_reason = row.finish_reason or reason
            row.on_token(FINISHED)
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        self.rows = [self.rows[i] for i in keep]
        self._pickers = [self._pickers[i] for i in keep]
        if not self.rows:
            self._cache, self._logits = None, None
            self._mask = self._mask[:0, :0]
            self._next_position = self._next_position[:0]
            return
        self._select(torch.tensor(keep, device=self.device))
        if self.mergeable:  # left columns every remaining row masks: drop them
            used = self._mask.any(dim=0).nonzero()
            unused = int(used[0]) if len(used) else 0
            if unused:
                self._mask = self._mask[:, unused:]
                for layer in self._cache.layers:
                    layer.keys = layer.keys[:, :, unused:]
                    layer.values = layer.values[:, :, unused:]

    def _select(self, index: torch.Tensor) -> None:
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._next_position = self._next_position[index]
        self._logits = self._logits[index]


def _returned_cache(out) -> DynamicCache:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """`t` padded with zeros on the left of its sequence axis (-2 for keys/values of
    shape [rows, heads, length, dim], -1 for a mask [rows, length]) up to `length`."""
    axis = -1 if t.dim() == 2 else -2
    missing = length - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)
