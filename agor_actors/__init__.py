"""agor-actors: real-time state broadcasting and multi-client sync runtime for Agor, on trio."""
