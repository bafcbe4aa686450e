"""The Celery app and its routing table (the service settings every process reads are in core/settings.py)."""
