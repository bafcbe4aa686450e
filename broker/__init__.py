"""The Celery app, its routing table, and the service settings every process reads."""
