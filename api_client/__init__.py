"""The Python client and the `newslora` CLI built on it (the CLI never touches the database)."""
from api_client.client import ApiError, Client

__all__ = ["Client", "ApiError"]
