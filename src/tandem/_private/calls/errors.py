"""Internal errors that steer routing (importable in every process, so they pickle)."""

from __future__ import annotations

from tandem.exceptions import ReplicaUnavailableError


class ReplicaNotReached(ReplicaUnavailableError):
    """The request never started on the replica (unreachable, or no longer accepting).

    The router may send it to another replica.
    """
