"""The one place that knows how this Ray version spells an actor pool (ecosystem notes §1.2).

Ray flipped between `compute=` and `concurrency=` twice (2.9, 2.51); restart caps have no named
parameter in 2.60 and still go through the deprecated `**ray_remote_args`. Callers ask for a fixed pool
here and spread the result into `map_batches`.
"""
from __future__ import annotations

import warnings
from typing import Any


def actor_pool(ray, *, size: int, num_gpus: float, num_cpus: float, max_restarts: int, max_task_retries: int) -> dict[str, Any]:
    """map_batches kwargs for a fixed-size actor pool with capped restarts (pain points 1, 8, 9)."""
    # Ray Data's default is max_restarts=-1 (unlimited): a deterministic crash on one row would loop forever
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
    return dict(compute=ray.data.ActorPoolStrategy(size=size), num_gpus=num_gpus, num_cpus=num_cpus,
                max_restarts=max_restarts, max_task_retries=max_task_retries)
