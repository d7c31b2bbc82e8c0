"""When a process is contained: sustained deviation in how it behaves, corroborated by what it reaches.

No single signal contains a process, because each one alone has fired on normal work:
the model's score on a process's first windows (a python start in CI crossed a bar
calibrated on 150 s), 3-gram novelty near its bar, and files opened in never-seen
folders (systemd under the containment cgroups). The rule combines two kinds of evidence:

- behaviour, sustained: in at least `k` of the process's last `n` judged windows its
  smoothed novelty was above `novelty_bar`, or in at least `k` of its last `n`
  model-scored windows its process score was above the profile's calibrated bar plus
  `model_margin` (the model counts only when that bar came from `min_calibration`
  scores or more: a bar from a handful of scores is their maximum, not a 1% tail);
- reach, corroborating: files opened in at least `folder_bar` folders the profile never
  opened files in while learning, or a connection to a destination it never used.

Both must hold. A profile learned from fewer than `min_learned_windows` windows has too
little normal behind it to hold anyone: it alerts but never contains.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    novelty_bar: float = 0.2  # normal windows of a learned profile sit near 0; exfiltration at 0.3-0.4
    model_margin: float = 0.5  # nats above the profile's calibrated threshold
    k: int = 3
    n: int = 5
    folder_bar: int = 4
    min_learned_windows: int = 100
    min_calibration: int = 100


@dataclass
class Track:
    """One process's evidence so far (reset when an operator releases it)."""

    n: int
    novelty: deque[bool] = field(init=False)  # per judged window: smoothed novelty over the bar
    model: deque[bool] = field(init=False)  # per model-scored window: process score over the bar
    new_folders: set[str] = field(default_factory=set)
    new_dests: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.novelty = deque(maxlen=self.n)
        self.model = deque(maxlen=self.n)

    def reset(self) -> None:
        self.novelty.clear()
        self.model.clear()
        self.new_folders.clear()
        self.new_dests.clear()


@dataclass(frozen=True)
class Verdict:
    act: bool  # alert (and contain, if `hold` and the monitor is in contain mode)
    hold: bool  # the profile has learned enough to contain on its word
    reason: str
    behaviour: bool = False  # the behaviour half held (counted when the reach half did not)
    reach: bool = False


def judge(rule: Rule, track: Track, learned_windows: int) -> Verdict:
    """Apply the rule to a process's evidence; `learned_windows`: its profile's normal windows."""
    behaviour = []
    if sum(track.novelty) >= rule.k:
        behaviour.append(f"novelty above {rule.novelty_bar:.2f} in {sum(track.novelty)} of its last "
                         f"{len(track.novelty)} windows")
    if sum(track.model) >= rule.k:
        behaviour.append(f"model score above its profile's bar in {sum(track.model)} of its last "
                         f"{len(track.model)} scored windows")
    reach = []
    if len(track.new_folders) >= rule.folder_bar:
        reach.append(f"files opened in {len(track.new_folders)} folders its profile never used")
    if track.new_dests:
        reach.append(f"connections to {len(track.new_dests)} destinations its profile never used "
                     f"({', '.join(sorted(track.new_dests)[:3])})")
    if not behaviour or not reach:
        return Verdict(False, False, "", bool(behaviour), bool(reach))
    hold = learned_windows >= rule.min_learned_windows
    reason = "; ".join(behaviour) + ", and " + "; ".join(reach)
    if not hold:
        reason += (f" (observe only: its profile learned {learned_windows} windows, "
                   f"fewer than {rule.min_learned_windows})")
    return Verdict(True, hold, reason, True, True)
