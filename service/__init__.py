"""Custody: a conversation service that keeps Gemini history encrypted in its own Postgres."""
