"""Helpers for the project's own tests (multi-rank runs through the real ``deepspeed`` launcher)."""
