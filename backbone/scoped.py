"""`ScopedValue`: how a forward call hands per-call data to code deep inside open_clip without changing its signatures.

One carrier for all three cases: which samples use which task's residual prompts (`prompts.RoutingState`, read by
each `PromptedAttention`), which image-text prompt tokens are active (`token_prompts.applied`, read by forward hooks),
and the prompt inputs of an ONNX export (`onnx_export`, read by the export-time wrappers).

Why thread-local: the engine runs forwards of one shared model from several threads at once, and each must see only
its own routing. A `ContextVar` would isolate them as well, but a carrier is made per model (and per export), and the
Python docs ask for ContextVars to be created once at module level (contexts keep strong references to them). What differs, a value following a coroutine across an `await` or into
`asyncio.to_thread`, is never needed: every `use` block wraps one synchronous forward in the thread that runs it.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class ScopedValue(Generic[T]):
    """`with carrier.use(value):` sets the value for the calling thread until the block ends; `get()` reads it."""

    def __init__(self, default: T):
        self._default = default
        self._local = threading.local()

    def get(self) -> T:
        return getattr(self._local, "value", self._default)

    @contextmanager
    def use(self, value: T) -> Iterator[None]:
        previous = self.get()
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = previous  # nested blocks restore the outer value
