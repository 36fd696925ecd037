"""selectd: the daemon that serves many `servers` from one selectors loop.

Layering, bottom up: errors, log, config (TOML -> frozen dataclasses) <- signals, timers,
listeners (the `servers` transports with selectd's policy) <- threadpool, forkpool/worker
(dispatch) <- supervisor (the loop) <- cli (the `selectd` command).
"""

__version__ = "0.1.0"
