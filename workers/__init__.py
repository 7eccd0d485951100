"""The Celery app: queues, tasks and job progress."""
