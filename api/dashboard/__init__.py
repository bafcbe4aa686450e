"""The web dashboard: jobs, evaluations and predictions, served by the API under /dashboard."""
from api.dashboard.router import is_public_path, router

__all__ = ["router", "is_public_path"]
