"""Alembic migrations of the decision record (`python -m service.cli migrate`, or at service start-up)."""
