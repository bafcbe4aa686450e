"""The API's routes, one router per resource: jobs, datasets, models (adapters and exports), evaluations."""
