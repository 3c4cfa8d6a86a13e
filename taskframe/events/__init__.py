"""Events: Celery's event protocol (celeryev), sent and received."""
