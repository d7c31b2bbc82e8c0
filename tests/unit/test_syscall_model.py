"""The syscall model: data as the README says, a held-out split, numpy = torch, shipped weights
that separate attacks from normals, calibration, and the profile store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.syscall.data import DEFAULT_DATA, SplitConfig, load, quirks, split
from models.syscall.export import export
from models.syscall.model import WEIGHTS_NPZ, Checkpoint, ModelConfig, SyscallLM, Vocab
from neuraos_agent.monitor.profile import Baseline, ProfileError, ProfileKey, ProfileStore
from neuraos_agent.monitor.scorer import StreamScorer, SyscallModel, WindowScore, calibrate, trace_score

needs_data = pytest.mark.skipif(not DEFAULT_DATA.exists(), reason=f"ADFA-LD not at {DEFAULT_DATA}")


@pytest.fixture(scope="module")
def ds():
    if not DEFAULT_DATA.exists():
        pytest.skip(f"ADFA-LD not at {DEFAULT_DATA}")
    return load(DEFAULT_DATA)


@needs_data
def test_loader_counts_match_the_readme(ds) -> None:
    q = quirks(ds)
    assert q["traces"] == {"train": 833, "validation": 4372, "attack": 746}
    assert q["syscalls_total"] == 2_747_550
    assert q["distinct_syscalls"] == 175 and q["syscalls_in_train"] == 150
    assert q["distinct_sequences"]["validation"] == 2420
    assert q["validation_traces_identical_to_a_train_trace"] == 422
    assert sorted(d["normal_copies"] + d["attack_copies"] for d in q["sequences_labelled_normal_and_attack"]) == [2, 6]
    assert {t.attack_type for t in ds.attack} == {"Hydra_FTP", "Hydra_SSH", "Adduser", "Java_Meterpreter",
                                                  "Meterpreter", "Web_Shell"}
    assert len({t.attack_instance for t in ds.attack}) == 60
    assert q["median_length"] == {"train": 201.0, "validation": 343.0, "attack": 290.0}


@needs_data
def test_split_is_deterministic_disjoint_and_complete(ds) -> None:
    a, b = split(ds, SplitConfig(seed=3)), split(ds, SplitConfig(seed=3))
    other = split(ds, SplitConfig(seed=4))
    paths = lambda ts: [t.path for t in ts]  # noqa: E731
    assert paths(a.test_normal) == paths(b.test_normal) and a.fit_digest() == b.fit_digest()
    assert a.fit_digest() != other.fit_digest()
    sides = [set(paths(s)) for s in (a.fit, a.calib, a.test_normal)]
    assert sum(map(len, sides)) == len(set().union(*sides)) == len(ds.normal)  # nothing dropped, no overlap
    assert {t.path for t in ds.train} <= sides[0]
    fitted = {t.syscalls for t in a.fit}
    assert not any(t.syscalls in fitted for t in a.calib + a.test_normal)  # held out by content too
    dev_runs, test_runs = ({t.attack_instance for t in s} for s in (a.dev_attack, a.test_attack))
    assert dev_runs and test_runs and not dev_runs & test_runs
    assert len(a.dev_attack) + len(a.test_attack) == len(ds.attack)


def _random_model(tmp_path: Path, layers: int = 1) -> tuple[SyscallLM, SyscallModel]:
    torch.manual_seed(0)
    lm = SyscallLM(Vocab(tuple(range(0, 300, 2))), ModelConfig(embed=8, hidden=24, layers=layers, window=16))
    for p in lm.parameters():  # larger than the default init, so the recurrence really matters
        torch.nn.init.normal_(p, std=0.4)
    path = export(Checkpoint(lm.config, lm.vocab, lm.state_dict(), {"half_life_windows": 4}),
                  tmp_path / "m.npz", names={0: "restart_syscall", 2: "fork", 4: "write"})
    return lm, SyscallModel.load(path)


@pytest.mark.parametrize("layers", [1, 2])
def test_numpy_scorer_equals_torch(tmp_path: Path, layers: int) -> None:
    lm, model = _random_model(tmp_path, layers)
    rng = np.random.default_rng(1)
    traces = [list(rng.integers(0, 320, n)) for n in (1, 17, 250, 2500)]  # odd numbers are unknown
    for ours, ref in zip(model.surprise_many(traces), lm.surprise(traces)):
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < 1e-4
    assert model.encode(["write", "fork", 4, 5]).tolist() == model.encode([4, 2, 4, 5]).tolist()


def test_stream_gives_the_same_scores_as_whole_traces(tmp_path: Path) -> None:
    _, model = _random_model(tmp_path)
    trace = list(np.random.default_rng(2).integers(0, 300, 100))
    stream = StreamScorer(model)
    got = []
    for i in range(0, len(trace), 7):  # arrivals that do not line up with windows
        got += stream.feed("p", trace[i:i + 7])
        got += stream.feed("q", [0, 2])  # another process interleaved
    got = [w for w in got if w.process == "p"]
    got.append(stream.close("p"))
    whole = model.surprise(trace)
    assert [w.start for w in got] == [0, 16, 32, 48, 64, 80, 96]
    assert np.allclose([w.score for w in got], [whole[i:i + 16].mean() for i in range(0, 100, 16)], atol=1e-5)
    assert got[-1].process_score == pytest.approx(trace_score(whole, 16, 4), abs=1e-5)
    assert "p" not in stream._procs and stream.close("p") is None


def test_stream_stays_bounded(tmp_path: Path) -> None:
    _, model = _random_model(tmp_path)
    stream = StreamScorer(model, max_processes=3)
    for pid in range(10):
        stream.feed(pid, [0, 2])
    assert len(stream) == 3 and stream.stats.evicted == 7


@needs_data
def test_committed_weights_score_attacks_above_normals(ds) -> None:
    model = SyscallModel.load(WEIGHTS_NPZ)
    sp = split(ds, SplitConfig(**model.meta["split"]))
    assert model.meta["fit_digest"] == sp.fit_digest()  # the test traces below were held out from it
    rng = np.random.default_rng(0)
    pick = lambda ts: [ts[i].syscalls for i in rng.choice(len(ts), 40, replace=False)]  # noqa: E731
    score = lambda ts: np.array([trace_score(s, model.window, model.half_life)  # noqa: E731
                                 for s in model.surprise_many(ts)])
    normal_traces, attack_traces = pick(sp.test_normal), pick(sp.test_attack)
    normal, attack = score(normal_traces), score(attack_traces)
    assert np.median(attack) > np.median(normal)
    assert np.mean(attack[:, None] > normal[None, :]) > 0.65  # AUC on the slice
    ckpt = Checkpoint.load()  # the committed .pt is the same model as the committed .npz
    few = normal_traces[:3] + attack_traces[:3]
    for ours, ref in zip(model.surprise_many(few), ckpt.model().surprise(few)):
        assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_calibration_hits_the_target_fpr_on_its_own_data(target: float) -> None:
    scores = np.random.default_rng(3).gamma(2.0, 1.0, 1000)
    thr = calibrate(scores, target)
    fpr = np.mean(scores > thr.value)
    assert target - 1 / len(scores) < fpr <= target and thr.n == 1000
    tied = np.r_[np.zeros(995), np.ones(5)]  # ties never push the rate above the target
    assert np.mean(tied > calibrate(tied, target).value) <= target
    with pytest.raises(ValueError):
        calibrate([], 0.01)


def _window(score: float, calls: tuple[str, ...] = ("read", "write", "read", "close")) -> WindowScore:
    return WindowScore("p", 0, 0, calls, score, score, score)


def test_profile_store_round_trips_and_versions(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path)
    key = ProfileKey(user="www-data", unit="nginx.service", exe="/usr/sbin/nginx")
    b = Baseline(key, model="m1")
    for s in np.linspace(0.0, 1.0, 200):
        b.observe(_window(float(s)))
    thr = b.freeze(0.05)
    assert store.save(b) == 1
    back = store.load(key)
    assert back is not None and back.to_json() == b.to_json()
    assert back.threshold == thr and back.is_anomalous(1.5) and not back.is_anomalous(0.5)
    assert back.novelty(("read", "write", "read")) == 0.0 and back.novelty(("execve", "socket", "dup2")) == 1.0
    with pytest.raises(ProfileError):
        back.observe(_window(0.1))  # frozen baselines learn only when asked to
    back.learn()
    for _ in range(50):
        back.observe(_window(3.0))
    back.freeze(0.05)
    assert store.save(back) == 2 and store.versions(key) == [1, 2]
    assert store.load(key, version=1).threshold == thr  # the old version is still there, unchanged
    assert store.load(key).threshold.value > thr.value
    (summary,) = store.summaries()
    assert summary["version"] == 2 and summary["versions"] == [1, 2] and summary["windows"] == 250
    assert summary["mode"] == "frozen" and summary["top_syscalls"][0] == "read"
    raw = json.loads((tmp_path / key.slug / "v000002.json").read_text())
    raw["schema"] = 99
    (tmp_path / key.slug / "v000002.json").write_text(json.dumps(raw))
    with pytest.raises(ProfileError):
        store.load(key)


def test_training_lanes_predict_every_call_exactly_once() -> None:
    from models.syscall.train import count_steps, lanes

    rng = np.random.default_rng(5)
    traces = [rng.integers(3, 50, n) for n in rng.integers(2, 300, 40)]
    order = rng.permutation(len(traces))
    batches = list(lanes(traces, 6, 16, order))
    assert len(batches) == count_steps([len(t) for t in traces], 6, 16, order)
    assert sum(int((x[:, 1:] != 0).sum()) for x, _ in batches) == sum(len(t) - 1 for t in traces)
    assert sum(int(fresh.sum()) for _, fresh in batches) >= len(traces)  # each trace starts from a zero state
