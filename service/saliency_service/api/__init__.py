"""The gRPC edge: decode requests, call the engine, encode responses, map errors to statuses."""
