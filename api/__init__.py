"""The HTTP service (FastAPI): jobs, events, predictions, datasets, models, evaluations."""
