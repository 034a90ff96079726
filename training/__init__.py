"""Learning one task: data adapters, learners, Ray Train entry point."""
