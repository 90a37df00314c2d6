"""Fixtures the API tests borrow: the service under a retention policy with a clock they move
(tests/retention/conftest.py), for the ops API and subject erasure."""

from ..retention.conftest import retention

__all__ = ["retention"]
