"""One base served with finished adapters that come and go, decoding continuously.

A background thread runs the `ContinuousDecoder`; requests are rows submitted to
it. Adapters are loaded into the bank (after their record is checked against the
served base) and retired from it between decoding steps, so a load or an eviction
never changes an adapter under a running row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from carpool.workers.after_training.fused_inference import BASE, FusedAdapters, Sampling
from carpool.workers.base.base_fingerprint import trained_on_other_base
from carpool.workers.data.dataset import prompt_ids
from carpool.workers.peft_files.finished_adapters import load_finished_adapter
from carpool.workers.peft_files.peft_format import AdapterFormatError
from carpool.workers.serving.continuous_batch import ContinuousDecoder, DecodeRow
from carpool.workers.spec.job_spec import QuantizationSpec


class AdapterRefusedError(ValueError):
    """An adapter that cannot serve on this base; the message names both."""


class PromptError(ValueError):
    """A prompt that cannot be decoded (no tokens, too long, no chat template)."""


class ServedModel:
    def __init__(
        self,
        base_model: str,
        *,
        quantization: QuantizationSpec | None = None,
        device: str | None = None,
        adapter_math: str = "auto",
        max_rows: int = 64,
        trust_remote_code: bool = False,
    ) -> None:
        # The bare base rides as one more adapter with no modules, named `base`.
        self.fused = FusedAdapters(
            base_model,
            {},
            include_base=True,
            device=device,
            adapter_math=adapter_math,
            trust_remote_code=trust_remote_code,
            quantization=quantization,
        )
        self.base_model = base_model
        self.tokenizer = self.fused.tokenizer
        config = self.fused.base.config
        self.context_length: int | None = getattr(config, "max_position_embeddings", None) or (
            getattr(config, "n_positions", None)
        )
        self.decoder = ContinuousDecoder(
            self.fused.base,
            self.fused.bank,
            self.tokenizer.pad_token_id,
            self.fused.stop_ids(),
            self.fused.device,
            max_rows=max_rows,
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self.decoder.run, args=(self._stopping,), name="carpool-decode", daemon=True
        )
        self._thread.start()

    # -- adapters ---------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> None:
        """Load the adapter at `path` under `name`; refuse one trained on another base."""
        try:
            why = trained_on_other_base(path, self.base_model)
        except ValueError as e:
            raise AdapterRefusedError(str(e)) from e
        if why is not None:
            raise AdapterRefusedError(why)
        try:
            adapter = load_finished_adapter(self.fused.base, name, path)
        except AdapterFormatError as e:
            raise AdapterRefusedError(f"{path}: {e}") from e
        self.decoder.add_adapter(adapter)

    def unload(self, name: str) -> None:
        if name != BASE:
            self.decoder.retire(name)

    @property
    def adapters(self) -> list[str]:
        return [n for n in self.fused.bank.adapters if n != BASE]

    # -- requests -----------------------------------------------------------------------------
    def prompt(self, record: dict) -> tuple[int, ...]:
        """A request's prompt tokens, rendered as `carpool generate` renders them."""
        try:
            ids = tuple(prompt_ids(record, self.tokenizer))
        except ValueError as e:
            raise PromptError(str(e)) from e
        if not ids:
            raise PromptError("the prompt has no tokens")
        return ids

    def check_length(self, prompt: tuple[int, ...], max_new_tokens: int) -> None:
        if self.context_length is None:
            return
        if len(prompt) + max_new_tokens > self.context_length:
            raise PromptError(
                f"the prompt's {len(prompt)} tokens and max_tokens {max_new_tokens} exceed "
                f"the base's context of {self.context_length} tokens"
            )

    def start(
        self,
        adapter: str,
        prompt: tuple[int, ...],
        sampling: Sampling,
        on_token: Callable[[int | None], None],
        key: str,
    ) -> DecodeRow:
        """Start decoding one row; `on_token` gets its tokens, then None."""
        if adapter not in self.fused.bank.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        row = DecodeRow(adapter, prompt, sampling, on_token, key=key)
        self.decoder.submit(row)
        return row

    def cancel(self, row: DecodeRow) -> None:
        self.decoder.cancel(row)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
