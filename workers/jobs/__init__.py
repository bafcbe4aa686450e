"""The job runtime: Celery tasks (glue), handlers, the runner's lease, pipelines and shards."""
