"""Host side of the host–guest link: one gRPC channel per guest."""
