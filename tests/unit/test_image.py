"""Guest image recipe: cache keys and mirror discovery (fast, nothing is built)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hypervisor.virt import image
from hypervisor.virt.image import find_mirror, image_key, image_keys, parse_sources, read_packages

REPO = Path(__file__).resolve().parents[2]
MIRROR = "http://deb.debian.org/debian"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of just what the keys are made from: the image recipe and the agent's tree."""
    shutil.copytree(REPO / "vm-templates" / "image", tmp_path / "vm-templates" / "image")
    shutil.copytree(REPO / "guest-agent", tmp_path / "guest-agent",
                    ignore=shutil.ignore_patterns("_gen", "__pycache__", "*.egg-info", "build"))
    return tmp_path


def test_recipe_is_complete() -> None:
    recipe = REPO / "vm-templates" / "image"
    pkgs = read_packages(recipe / "packages.txt")
    for p in ("systemd-sysv", "udev", "linux-image-amd64", "initramfs-tools", "python3",
              "python3-venv", "fuse3", "bpftrace", "qemu-guest-agent", "openssh-server",
              "iproute2", "nftables", "procps", "kmod", "dbus"):
        assert p in pkgs
    overlay = recipe / "overlay"
    unit = (overlay / "etc/systemd/system/neuraos-agent.service").read_text()
    assert "ExecStart=/opt/neuraos-agent/venv/bin/neuraos-agent run" in unit
    assert "Restart=always" in unit and "After=network-online.target" in unit
    assert "NEURAOS_LINK=10.0.2.100:50051" in unit
    assert "/dev/vda" in (overlay / "etc/fstab").read_text()
    assert "PasswordAuthentication no" in (overlay / "etc/ssh/sshd_config.d/neuraos.conf").read_text()
    rules = (overlay / "etc/udev/rules.d/80-neuraos-hotplug.rules").read_text()
    assert 'SUBSYSTEM=="cpu", ACTION=="add"' in rules and 'ATTR{online}="1"' in rules
    modules = (overlay / "etc/initramfs-tools/modules").read_text().split()
    assert {"virtio_blk", "virtio_pci", "virtio_net", "ext4"} <= set(modules)
    assert "root=/dev/vda" in image.CMDLINE and "console=ttyS0" in image.CMDLINE


def test_keys_are_stable(repo: Path) -> None:
    assert image_key(repo, MIRROR) == image_key(repo, MIRROR)
    base, final = image_key(repo, MIRROR)
    assert len(base) == len(final) == 16 and base != final
    # the copy has the same inputs as the real tree, so the same keys
    assert image_key(REPO, MIRROR) == (base, final)


def test_package_change_rebuilds_everything(repo: Path) -> None:
    before = image_keys(repo, MIRROR)
    pkgs = repo / "vm-templates/image/packages.txt"
    pkgs.write_text(pkgs.read_text() + "strace\n")
    after = image_keys(repo, MIRROR)
    assert after.bootstrap != before.bootstrap and after.base != before.base
    assert after.final != before.final


def test_package_comments_and_order_do_not_matter(repo: Path) -> None:
    before = image_key(repo, MIRROR)
    pkgs = repo / "vm-templates/image/packages.txt"
    lines = [line for line in pkgs.read_text().splitlines() if line and not line.startswith("#")]
    pkgs.write_text("# reordered\n" + "\n".join(reversed(lines)) + "\n\n")
    assert image_key(repo, MIRROR) == before


def test_overlay_change_keeps_debootstrap_layer(repo: Path) -> None:
    before = image_keys(repo, MIRROR)
    (repo / "vm-templates/image/overlay/etc/hostname").write_text("other\n")
    after = image_keys(repo, MIRROR)
    assert after.bootstrap == before.bootstrap
    assert after.base != before.base and after.final != before.final


def test_new_overlay_file_and_mode_change_the_base(repo: Path) -> None:
    before = image_keys(repo, MIRROR)
    new = repo / "vm-templates/image/overlay/etc/motd"
    new.write_text("hi\n")
    with_file = image_keys(repo, MIRROR)
    assert with_file.base != before.base
    new.chmod(0o755)
    assert image_keys(repo, MIRROR).base != with_file.base


def test_agent_change_rebuilds_only_the_image(repo: Path) -> None:
    before = image_keys(repo, MIRROR)
    init = repo / "guest-agent/neuraos_agent/__init__.py"
    init.write_text(init.read_text() + "\n# changed\n")
    after = image_keys(repo, MIRROR)
    assert (after.bootstrap, after.base) == (before.bootstrap, before.base)
    assert after.final != before.final


def test_proto_change_rebuilds_the_image(repo: Path) -> None:
    before = image_key(repo, MIRROR)
    proto = repo / "guest-agent/proto/neuraos_link.proto"
    proto.write_text(proto.read_text() + "\n// changed\n")
    assert image_key(repo, MIRROR)[1] != before[1]
    assert image_key(repo, MIRROR)[0] == before[0]


def test_generated_and_build_files_do_not_change_keys(repo: Path) -> None:
    before = image_key(repo, MIRROR)
    gen = repo / "guest-agent/neuraos_agent/_gen"
    gen.mkdir(exist_ok=True)
    (gen / "link_pb2.py").write_text("# generated\n")
    (repo / "guest-agent/neuraos_agent/__pycache__").mkdir(exist_ok=True)
    (repo / "guest-agent/neuraos_agent/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    (repo / "guest-agent/neuraos_agent.egg-info").mkdir(exist_ok=True)
    (repo / "guest-agent/build/lib").mkdir(parents=True)
    assert image_key(repo, MIRROR) == before


def test_mirror_is_part_of_the_key(repo: Path) -> None:
    assert image_key(repo, MIRROR) != image_key(repo, "http://ftp.de.debian.org/debian")


SAMPLE_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_parse_deb822_sources() -> None:
    assert parse_sources(SAMPLE_SOURCES, deb822=True) == ["http://deb.debian.org/debian"]


def test_parse_deb822_skips_disabled_source_only_and_other_suites() -> None:
    text = """\
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Enabled: no

Types: deb
URIs: http://old.example/debian/
Suites: bullseye

Types: deb deb-src
URIs: http://mirror.example/debian/
Suites: bookworm
Components: main
"""
    assert parse_sources(text, deb822=True) == ["http://mirror.example/debian"]


def test_parse_one_line_list() -> None:
    text = """\
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.fr.debian.org/debian/ bookworm main contrib
deb http://security.debian.org/debian-security bookworm-security main
deb-src http://ftp.fr.debian.org/debian bookworm main
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
"""
    assert parse_sources(text, deb822=False) == ["http://ftp.fr.debian.org/debian"]


def test_find_mirror_reads_dirs_and_skips_other_names(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(SAMPLE_SOURCES)
    (d / "zz.list.disabled-by-farm").write_text("deb http://ignored.example/debian bookworm main\n")
    (tmp_path / "sources.list").write_text("deb http://ftp.fr.debian.org/debian bookworm main\n")
    # deb.debian.org is preferred when present
    assert find_mirror([tmp_path / "sources.list", d]) == "http://deb.debian.org/debian"
    assert find_mirror([tmp_path / "sources.list"]) == "http://ftp.fr.debian.org/debian"
    only_disabled = tmp_path / "only"
    only_disabled.mkdir()
    (only_disabled / "x.list.disabled-by-farm").write_text("deb http://ignored.example/debian bookworm main\n")
    assert find_mirror([only_disabled, tmp_path / "missing.list"]) == image.FALLBACK_MIRROR


def test_cached_lookup_without_a_build(tmp_path: Path) -> None:
    """An incomplete image directory (a killed build, say) is never trusted."""
    _, final = image_key(REPO)
    d = tmp_path / "images" / final
    d.mkdir(parents=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img", "id_ed25519"):
        (d / name).write_bytes(b"x")
    assert image.cached_image(REPO, tmp_path) is None  # no manifest yet
    (d / "manifest.json").write_text("{}")
    img = image.ensure_image(REPO, tmp_path)
    assert img.key == final and not img.built and img.disk == d / "disk.qcow2"
    assert img.cmdline == image.CMDLINE


def test_failed_step_names_stage_and_log(tmp_path: Path) -> None:
    from hypervisor.errors import ImageBuildError

    lines: list[str] = []
    log = tmp_path / "build.log"
    with pytest.raises(ImageBuildError) as err:
        with image._Build(log, lines.append) as b:
            with b.stage("ok"):
                b.run(["sh", "-c", "echo 'I: Retrieving foo 1.0'"], watch=image._debootstrap_note)
            with b.stage("disk"):
                b.run(["sh", "-c", "echo boom >&2; exit 3"])
    msg = str(err.value)
    assert "stage 'disk'" in msg and str(log) in msg and "boom" in msg
    assert "boom" in log.read_text() and "Retrieving foo" in log.read_text()
    assert lines[:2] == ["[ok] started", "[ok] Retrieving foo 1.0"]
    assert "ok" in b.timings and "disk" not in b.timings


def test_rich_progress_gets_a_task_per_stage(tmp_path: Path) -> None:
    import io

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    with Progress(TextColumn("{task.description}"), console=Console(file=io.StringIO())) as p:
        with image._Build(tmp_path / "build.log", p) as b:
            for name in ("debootstrap", "disk"):
                with b.stage(name):
                    b.note("working")
    assert [t.description.split()[0] for t in p.tasks] == ["debootstrap", "disk"]
    assert p.tasks[0].description.endswith(" s[/]")  # the stage's time, shown in the description
    assert all(t.finished for t in p.tasks)
