"""The store: tables (models.py), engine and sessions (session.py), queries (jobs.py, results.py, auth.py, files.py)."""
