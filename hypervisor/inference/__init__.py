"""The host's model service: language models and embeddings for every guest, over its link.

`host.ModelHost` loads what this machine can run and owns it; `service.ModelService` is the
gRPC servicer the LinkServer mounts on each guest's channel (`services=host.service.handlers`).
"""
