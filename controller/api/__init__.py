"""The admin REST API (FastAPI): one router per resource, served in the controller's process."""
