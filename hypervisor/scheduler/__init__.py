"""Predictive scheduling: forecasts -> policy (this package) -> actuators."""
