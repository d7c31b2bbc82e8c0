"""Behavioural zero trust on the host: the guests' alerts, and the operator's release / kill."""
