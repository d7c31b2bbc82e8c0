"""Domain template rendering and validation against libvirt's real schema."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hypervisor.errors import TemplateError
from hypervisor.virt.accel import Accel
from hypervisor.virt.templates import (
    DEFAULT_TEMPLATE, DomainSpec, GuestPolicy, ImageRef, LinkSpec, PciAddress, render, render_validated,
)

needs_validator = pytest.mark.skipif(shutil.which("virt-xml-validate") is None,
                                     reason="virt-xml-validate not installed")


def spec(**kw) -> DomainSpec:
    base = dict(
        name="g1", image=ImageRef("abc", "/img/vmlinuz", "/img/initrd", "root=/dev/vda rw", "/img/key"),
        disk="/g/disk.qcow2", accel=Accel("tcg", "test"), link=LinkSpec("unix-fwd", "/run/n/g1.sock"),
        console_log="/g/console.log", vcpus=1, max_vcpus=4, memory_mib=512, max_memory_mib=1024,
        ssh_port=2222, policy=GuestPolicy(1, 3, 256, 1024, 5),
        qemu_args=("-netdev", "user,id=neura0,restrict=on,guestfwd=tcp:10.0.2.100:50051-cmd:socat - UNIX-CONNECT:/x"),
    )
    base.update(kw)
    return DomainSpec(**base)


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


@needs_validator
def test_tcg_guest_renders_valid_xml_with_everything_the_foundation_needs():
    root = parse(render_validated(spec()))
    assert root.get("type") == "qemu"
    assert root.find("vcpu").get("current") == "1" and root.find("vcpu").text == "4"
    assert root.find("memory").text == "1024" and root.find("currentMemory").text == "512"
    assert root.find("features/tcg/tb-cache").text == "128"
    assert root.find("cpu").get("mode") == "maximum"  # x86-64-v2 at least, for numpy
    assert root.find("devices/memballoon/stats").get("period") == "5"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/disk/target").get("bus") == "virtio"
    assert root.find("os/kernel").text == "/img/vmlinuz"
    assert root.find("devices/serial/log").get("file") == "/g/console.log"
    ns = "{https://neuraos.dev/xmlns/guest/1}"
    pol = root.find(f"metadata/{ns}guest/{ns}policy")
    assert pol.get("max-vcpus") == "3" and pol.get("priority") == "5"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert any("guestfwd=" in a for a in args)
    assert root.find("devices/vsock") is None and root.find("devices/hostdev") is None


@needs_validator
def test_kvm_vsock_and_gpu_passthrough_render_valid_xml():
    root = parse(render_validated(spec(accel=Accel("kvm", "t"), link=LinkSpec("vsock"), qemu_args=(),
                                       gpu=PciAddress.parse("0000:65:00.0"))))
    assert root.get("type") == "kvm"
    assert root.find("features/tcg") is None
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("devices/vsock/cid").get("auto") == "yes"
    addr = root.find("devices/hostdev/source/address")
    assert (addr.get("bus"), addr.get("slot"), addr.get("function")) == ("0x65", "0x00", "0x0")


def test_values_are_escaped_not_injected():
    root = parse(render(spec(console_log="/g/a'b<c>.log")))
    assert root.find("devices/serial/log").get("file") == "/g/a'b<c>.log"


def test_bad_pci_address_is_one_clear_error():
    with pytest.raises(TemplateError, match="bad PCI address"):
        PciAddress.parse("01:00")


def test_vcpus_above_max_refused():
    with pytest.raises(TemplateError, match="between 1 and max_vcpus"):
        render(spec(vcpus=8))


def test_malformed_template_names_the_line(tmp_path: Path):
    bad = tmp_path / "domain.xml.j2"
    lines = DEFAULT_TEMPLATE.read_text().splitlines()
    lines[9] = lines[9] + " {% if %}"
    bad.write_text("\n".join(lines))
    with pytest.raises(TemplateError, match=r"domain\.xml\.j2:10: "):
        render(spec(), bad)


def test_undefined_variable_in_template_names_the_line(tmp_path: Path):
    bad = tmp_path / "domain.xml.j2"
    bad.write_text("<domain>\n  <name>{{ spec.nmae }}</name>\n</domain>\n")
    with pytest.raises(TemplateError, match=r":2: .*nmae"):
        render(spec(), bad)


@needs_validator
def test_schema_violation_is_caught_before_libvirt(tmp_path: Path):
    bad = tmp_path / "domain.xml.j2"
    bad.write_text(DEFAULT_TEMPLATE.read_text().replace("<on_crash>destroy</on_crash>",
                                                         "<on_crash>explode</on_crash>"))
    with pytest.raises(TemplateError, match="libvirt's schema"):
        render_validated(spec(), bad)
