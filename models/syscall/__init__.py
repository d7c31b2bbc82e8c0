"""Syscall sequence model for behavioural zero trust: data, model, training, export to numpy."""
