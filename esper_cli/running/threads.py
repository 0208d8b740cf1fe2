"""The one place Simic sets torch's intra-op thread count.

The count changes the order of float sums, so an episode's (and a training run's) numbers depend
on it: episodes, behaviour cloning and PPO all run with the count they were asked for, whichever
process or worker they land in.
"""

from __future__ import annotations

import torch


def use_threads(threads: int) -> None:
    """Run this process's torch ops on `threads` intra-op threads (a no-op when it already does)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
