"""A tenant-aware, OpenAI-compatible inference gateway.

Importing the package does no work: the application is built by `gateway.app.create_app(settings)`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
