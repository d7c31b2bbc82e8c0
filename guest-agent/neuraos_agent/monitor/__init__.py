"""Behavioural monitoring inside the guest: syscall windows scored against each profile's baseline.

`scorer` runs the exported syscall model in numpy (no torch in the guest) and streams
window scores per process; `profile` keeps each profile's learned baseline on disk.
"""
