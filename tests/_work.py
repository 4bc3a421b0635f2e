"""Proof that a call did no work: no JAX compilation, little memory."""

import tracemalloc

import jax

COMPILE = "/jax/core/compile/backend_compile_duration"


class Compiles:
    """Records the name of each function JAX compiles inside ``with`` (``names``)."""

    def __enter__(self):
        self.names = []
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def _record(self, event, duration, **kwargs):
        if event == COMPILE:
            self.names.append(kwargs.get("fun_name", ""))

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._record)

    def of(self, *functions) -> int:
        """Compilations of the jitted ``functions`` (by their Python name)."""
        wanted = {f"jit({f.__name__})" for f in functions}
        return sum(name in wanted for name in self.names)


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
