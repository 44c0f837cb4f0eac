"""tritonclient-based client library and the `chorus` client commands."""
