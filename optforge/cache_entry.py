"""What the cache says about one key, in the vocabulary both the cache (which answers) and the planner
(which asks) use. Pure: a module of its own so that neither of them imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class EntryState:
    """A cache entry as seen by the planner. status: ok | failed | missing | corrupted. `digest` (all but
    missing): optforge.cache.entry_digest of its manifest, what a lock file records for an entry that
    holds code, and how the executor tells an entry sealed since the plan from the one it planned with."""

    status: str
    reason: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    digest: Optional[str] = None
