"""Ray Serve application: router, inference engine, HTTP API, Gradio UI, settings."""
