"""Proof that a call did no work: no JAX compilation, little memory."""

import tracemalloc

import jax


class NoWork:
    """Records JAX traces/compiles and the peak of traced allocations inside ``with``."""

    def __enter__(self):
        self.events = []
        jax.monitoring.register_event_duration_secs_listener(self._record)
        tracemalloc.start()
        return self

    def _record(self, name, *args, **kwargs):
        if name.startswith("/jax/core/compile"):
            self.events.append(name)

    def __exit__(self, *exc):
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        jax.monitoring.unregister_event_duration_listener(self._record)
