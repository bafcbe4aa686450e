"""The store: tables (models.py), engine and sessions (session.py), queries (jobs.py, artifacts.py)."""
