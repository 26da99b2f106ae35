"""Every Prometheus metric of the service, defined in one place."""
