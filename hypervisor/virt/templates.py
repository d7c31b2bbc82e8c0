"""Render guest domain XML from vm-templates/domain.xml.j2 and validate it.

Nothing reaches libvirt unvalidated: the rendered XML goes through
`virt-xml-validate` (libvirt's RelaxNG schema) first. Template mistakes are
reported with the template's file and line.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import jinja2

from hypervisor.errors import TemplateError
from hypervisor.virt.accel import Accel

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO / "vm-templates" / "domain.xml.j2"
METADATA_NS = "https://neuraos.dev/xmlns/guest/1"
_PCI = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


@dataclass(frozen=True)
class GuestPolicy:
    """Per-guest bounds the scheduler must respect; stored in the domain <metadata>."""

    min_vcpus: int = 1
    max_vcpus: int = 4
    min_memory_mib: int = 256
    max_memory_mib: int = 2048
    priority: int = 0


@dataclass(frozen=True)
class PciAddress:
    domain: str
    bus: str
    slot: str
    function: str

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        m = _PCI.match(text.strip())
        if not m:
            raise TemplateError(f"bad PCI address {text!r}", "use the form 0000:01:00.0 (see lspci -D)")
        dom, bus, slot, fn = m.groups()
        return cls((dom or "0000").lower(), bus.lower(), slot.lower(), fn)


@dataclass(frozen=True)
class LinkSpec:
    kind: str  # "unix-fwd" | "vsock"
    socket: str = ""


@dataclass(frozen=True)
class ImageRef:
    key: str
    kernel: str
    initrd: str
    cmdline: str
    ssh_key: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    image: ImageRef
    disk: str
    accel: Accel
    link: LinkSpec
    console_log: str
    vcpus: int = 1
    max_vcpus: int = 4
    memory_mib: int = 768
    max_memory_mib: int = 1536
    ssh_port: int = 0
    tb_cache_mib: int = 128
    balloon_stats_period_s: int = 5
    emulator: str = "/usr/bin/qemu-system-x86_64"
    gpu: PciAddress | None = None
    policy: GuestPolicy = field(default_factory=GuestPolicy)
    qemu_args: tuple[str, ...] = ()

    def check(self) -> None:
        if not 1 <= self.vcpus <= self.max_vcpus:
            raise TemplateError(f"vcpus {self.vcpus} must be between 1 and max_vcpus {self.max_vcpus}")
        if not 64 <= self.memory_mib <= self.max_memory_mib:
            raise TemplateError(
                f"memory {self.memory_mib} MiB must be between 64 and max_memory {self.max_memory_mib} MiB")


def _xml_attr(value: object) -> str:
    """Escape for a single-quoted XML attribute (quoteattr picks its own quotes)."""
    q = quoteattr(str(value), {"'": "&apos;"})
    return q[1:-1]


def render(spec: DomainSpec, template: Path = DEFAULT_TEMPLATE) -> str:
    """Render the template; TemplateError names the template line on mistakes."""
    spec.check()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template.parent)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_xml_attr,
        keep_trailing_newline=True,
    )
    try:
        tpl = env.get_template(template.name)
        return tpl.render(spec=spec, ns=METADATA_NS)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{e.filename or template}:{e.lineno}: {e.message}") from None
    except jinja2.TemplateNotFound:
        raise TemplateError(f"template not found: {template}") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"{template}:{_template_lineno(e, template)}: {e.message}") from None


def _template_lineno(exc: BaseException, template: Path) -> str:
    tb = exc.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(template):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


def validate(xml: str, template: Path = DEFAULT_TEMPLATE) -> None:
    """Check XML against libvirt's domain schema; TemplateError with the line if not."""
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=True) as f:
        f.write(xml)
        f.flush()
        try:
            proc = subprocess.run(["virt-xml-validate", f.name, "domain"],
                                  capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise TemplateError("virt-xml-validate is missing",
                                "install libvirt-clients (bash .ci/setup)") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        first = next((ln for ln in lines if f.name in ln), lines[0] if lines else "invalid")
        first = first.replace(f.name, f"rendered {template.name}")
        raise TemplateError(f"domain XML fails libvirt's schema: {first}")


def render_validated(spec: DomainSpec, template: Path = DEFAULT_TEMPLATE) -> str:
    xml = render(spec, template)
    validate(xml, template)
    return xml
