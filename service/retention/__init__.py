"""Retention: the runner that purges conversations past their deadline and the provider's stale copies."""

from ._runner import Candidate, RunSummary, pending_provider_copies, preview, run_retention

__all__ = ["Candidate", "RunSummary", "pending_provider_copies", "preview", "run_retention"]
