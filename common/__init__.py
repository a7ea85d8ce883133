"""Helpers shared by the agent, controller, waypoint and tools: identity, TLS, logging, flags."""
