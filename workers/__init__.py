"""What runs on a queue: one module per kind of job (plain functions) plus thin Celery tasks."""
