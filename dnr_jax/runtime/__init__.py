"""Running the method: compiling the step across devices, and keeping a run alive.

``runner`` (``Runner``: the step compiled with ``jit(shard_map)`` or ``pmap``, state
and batches placed on the devices), ``pipeline`` (per-epoch shuffling, per-process
batches, prefetching), ``checkpoints`` (orbax, config-checked resume),
``early_stopping``, ``guards`` (non-finite and collapse checks), ``preemption``
(SIGTERM / SIGINT as a stop request), ``distributed`` (multi-process set-up),
``host_allocator`` (CPU memory reuse) and ``params_io`` (parameter files).
"""
