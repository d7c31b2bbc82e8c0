"""Accelerator choice, qemu.conf editing, config loading, the state store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypervisor.config import from_dict, load
from hypervisor.errors import AccelError, NeuraError
from hypervisor.state import Store
from hypervisor.virt.accel import detect_accel
from hypervisor.virt.daemons import ensure_qemu_conf


def test_pvm_host_gets_tcg_with_the_reason(tmp_path: Path):
    dev = tmp_path / "kvm"
    dev.write_text("")
    (tmp_path / "mod" / "kvm_pvm").mkdir(parents=True)
    acc = detect_accel("auto", dev=dev, sys_module=tmp_path / "mod")
    assert acc.kind == "tcg" and "PVM" in acc.reason and acc.domain_type == "qemu"


def test_missing_kvm_gets_tcg_and_forced_kvm_fails(tmp_path: Path):
    acc = detect_accel("auto", dev=tmp_path / "nokvm", sys_module=tmp_path)
    assert acc.kind == "tcg" and "does not exist" in acc.reason
    with pytest.raises(AccelError, match="KVM requested"):
        detect_accel("kvm", dev=tmp_path / "nokvm", sys_module=tmp_path)


def test_kvm_node_that_cannot_create_a_vm_gets_tcg(tmp_path: Path):
    dev = tmp_path / "kvm"
    dev.write_text("not a kvm device")
    acc = detect_accel("auto", dev=dev, sys_module=tmp_path / "mod")
    assert acc.kind == "tcg" and "KVM" in acc.reason


def test_qemu_conf_edit_is_idempotent_and_keeps_other_lines(tmp_path: Path):
    conf = tmp_path / "qemu.conf"
    conf.write_text('# comment\nuser = "root"\n#seccomp_sandbox = 1\nseccomp_sandbox = 1\n')
    assert ensure_qemu_conf(conf) is True
    text = conf.read_text()
    assert 'user = "root"' in text and "#seccomp_sandbox = 1" in text
    assert "seccomp_sandbox = 0" in text and "\nseccomp_sandbox = 1" not in text
    assert ensure_qemu_conf(conf) is False


def test_config_defaults_and_unknown_keys(tmp_path: Path):
    cfg = from_dict({"accel": "tcg", "guest": {"max_vcpus": 8}, "state_dir": str(tmp_path)})
    assert cfg.accel == "tcg" and cfg.guest.max_vcpus == 8 and cfg.store_path == tmp_path / "state.db"
    with pytest.raises(NeuraError, match="unknown key 'acel'"):
        from_dict({"acel": "tcg"})
    bad = tmp_path / "bad.toml"
    bad.write_text("accel = \n")
    with pytest.raises(NeuraError, match="bad.toml"):
        load(bad)


def test_store_survives_reopen(tmp_path: Path):
    s = Store(tmp_path / "state.db")
    s.put_guest("g1", {"ssh_port": 2222})
    s.heartbeat("g1", 100.0)
    s.status("g1", {"cpus_online": 2})
    s.event("g1", "vcpus", "2")
    s.close()
    s2 = Store(tmp_path / "state.db")
    rec = s2.guest("g1")
    assert rec.spec == {"ssh_port": 2222} and rec.heartbeats == 1 and rec.status == {"cpus_online": 2}
    assert [e.kind for e in s2.events("g1")] == ["vcpus"]


def test_corrupt_store_is_a_clear_error(tmp_path: Path):
    p = tmp_path / "state.db"
    p.write_bytes(os.urandom(4096))
    from hypervisor.errors import StateError
    with pytest.raises(StateError, match="unusable"):
        Store(p)
