"""The worker: consumer loop, requests, tracing, lifecycle."""
