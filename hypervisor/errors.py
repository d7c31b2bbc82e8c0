"""One exception hierarchy for the controller.

Every expected failure is a `NeuraError` with a one-line message and a hint; the
CLI prints those two lines and exits non-zero, never a traceback.
"""

from __future__ import annotations


class NeuraError(Exception):
    """An expected failure an operator can act on."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class DaemonError(NeuraError):
    hint = "start it with `libvirtd -d` (and virtlogd -d, virtlockd -d), or run `bash .ci/setup`"


class AccelError(NeuraError):
    hint = "check /dev/kvm, or let NeuraOS fall back to TCG with accel = \"tcg\""


class TemplateError(NeuraError):
    hint = "fix the template or the guest settings it was rendered with"


class GuestNotFound(NeuraError):
    hint = "`neuraos list` shows the guests libvirt knows"


class GuestVanished(NeuraError):
    hint = "the guest was destroyed or undefined outside NeuraOS; `neuraos up` boots it again"


class AgentTimeout(NeuraError):
    hint = "see the guest's console with `neuraos console NAME`; the agent may still be booting"


class ImageBuildError(NeuraError):
    hint = "see the build log under the image cache directory; a second run resumes from the cache"


class LinkError(NeuraError):
    hint = "the guest's link channel is down; the agent reconnects by itself"


class StateError(NeuraError):
    hint = "the state store is damaged; move it aside and NeuraOS rebuilds it from libvirt"
