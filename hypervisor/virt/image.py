"""Build the NeuraOS guest image from Debian's packages, once, and cache it.

The recipe lives in `vm-templates/image/`: `packages.txt` (what debootstrap installs),
`overlay/` (files copied into the rootfs), `configure.sh` (chroot steps for the base) and
`install-agent.sh` (chroot steps that install the agent's venv). The result is a raw ext4 file
system converted to qcow2 (root is the whole `/dev/vda`, no partition table), the kernel and
initrd beside it for direct kernel boot, and a per-build ed25519 key for root's ssh login.

Layers, each cached under the cache root and keyed by a hash of exactly what it is made from:

    bootstrap/<key>   debootstrap --variant=minbase of packages.txt    (packages, mirror, version)
    base/<key>        bootstrap + overlay/ + configure.sh              (== image_key()[0])
    images/<key>      base + agent venv + disk, kernel, initrd, key    (== image_key()[1])

A change in the agent's source rebuilds only `images/`; a change in the overlay reuses the
debootstrap layer. Every layer is built in `tmp/` and renamed into place when complete, so a killed
build never leaves something a later run would trust; the next build clears what it left.

    image = ensure_image(repo)          # cached: returns in milliseconds
    python -m hypervisor.virt.image [--rebuild] [--cache DIR] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from hypervisor.errors import ImageBuildError

if TYPE_CHECKING:  # rich is imported only when something is built
    from rich.progress import Progress

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("/var/cache/neuraos/images")

# Bump when the build steps in this file change in a way that changes what a layer contains.
BUILDER_VERSION = "1"
AGENT_LAYER_VERSION = "1"

SUITE = "bookworm"
VARIANT = "minbase"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

# Root is the whole virtio disk; eth0 is the virtio NIC. The rest shortens a TCG boot.
CMDLINE = ("root=/dev/vda rootfstype=ext4 rw console=ttyS0 net.ifnames=0 quiet "
           "mitigations=off tsc=reliable no_timer_check systemd.firstboot=off")

MIN_DISK_BYTES = 3 << 30
HEADROOM_BYTES = 1 << 30
KEEP_IMAGES = int(os.environ.get("NEURAOS_KEEP_IMAGES", "4"))  # older image layers pruned after a build (newest first)
KEEP_BASES = 2    # likewise base and bootstrap layers

# Not part of the agent's source: generated, built or cached files.
_AGENT_SKIP_DIRS = {"_gen", "__pycache__", "build", "dist", ".pytest_cache", ".mypy_cache"}
_AGENT_SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")

ProgressArg = Union["Progress", Callable[[str], None], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: boot it with `kernel`/`initrd`/`cmdline` and `disk` as /dev/vda."""

    key: str
    disk: Path
    kernel: Path
    initrd: Path
    ssh_key: Path
    cmdline: str
    built: bool


@dataclass(frozen=True)
class ImageKeys:
    bootstrap: str
    base: str
    final: str


# ----------------------------------------------------------------------------- apt mirror


def parse_sources(text: str, deb822: bool, suite: str = SUITE) -> list[str]:
    """Debian archive URIs (not -security, -ports ...) that serve `suite` in an apt sources text.

    `deb822` selects the `.sources` format (stanzas of `Field: value`); otherwise one-line
    `deb [options] URI SUITE COMPONENTS...` entries.
    """
    found: list[str] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            last = ""
            for line in stanza.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if line[0].isspace() and last:
                    fields[last] += " " + line.strip()
                    continue
                name, sep, value = line.partition(":")
                if sep:
                    last = name.strip().lower()
                    fields[last] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in fields.get("types", "").split():
                continue
            if suite not in fields.get("suites", "").split():
                continue
            found += [u for u in fields.get("uris", "").split() if _is_debian_archive(u)]
    else:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            line = re.sub(r"\[[^\]]*\]", " ", line[4:])
            parts = line.split()
            if len(parts) >= 2 and parts[1] == suite and _is_debian_archive(parts[0]):
                found.append(parts[0])
    return [u.rstrip("/") for u in found]


def _is_debian_archive(uri: str) -> bool:
    return uri.startswith(("http://", "https://")) and uri.rstrip("/").endswith("/debian")


def find_mirror(sources: Iterable[Path] = APT_SOURCES, suite: str = SUITE) -> str:
    """The host's configured Debian mirror for `suite`; FALLBACK_MIRROR when there is none.

    Reads sources.list files and *.list / *.sources in directories (other names, such as
    `*.disabled`, are skipped as apt skips them). A deb.debian.org URI is preferred.
    """
    files: list[Path] = []
    for p in sources:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".list", ".sources"))
        elif p.is_file():
            files.append(p)
    uris: list[str] = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        uris += parse_sources(text, deb822=f.suffix == ".sources", suite=suite)
    for u in uris:
        if "deb.debian.org/debian" in u:
            return u
    return uris[0] if uris else FALLBACK_MIRROR


# ----------------------------------------------------------------------------- cache keys


def recipe_dir(repo: Path) -> Path:
    return Path(repo) / "vm-templates" / "image"


def read_packages(path: Path) -> list[str]:
    """Package names from packages.txt: one a line, '#' comments, sorted and unique."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.update(line.split())
    return sorted(names)


def _tree_digest(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> str:
    """sha256 over every file's relative path, exec bit and content (symlinks by target)."""
    h = hashlib.sha256()
    entries: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not skip(d / n))
        entries += [d / n for n in filenames if not skip(d / n)]
    for p in sorted(entries, key=lambda p: p.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            h.update(f"L {rel} -> {os.readlink(p)}\0".encode())
            continue
        mode = "x" if os.stat(p).st_mode & 0o111 else "-"
        h.update(f"F {rel} {mode}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _agent_skip(p: Path) -> bool:
    return p.name in _AGENT_SKIP_DIRS or p.name.endswith(_AGENT_SKIP_SUFFIXES)


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def image_keys(repo: Path, mirror: str | None = None) -> ImageKeys:
    """All three layer keys; reads only the recipe and the agent's source (and apt sources)."""
    repo = Path(repo)
    recipe = recipe_dir(repo)
    mirror = mirror or find_mirror()
    bootstrap = _hash("bootstrap", BUILDER_VERSION, SUITE, VARIANT, mirror,
                      " ".join(read_packages(recipe / "packages.txt")))
    base = _hash("base", bootstrap, _tree_digest(recipe / "overlay"),
                 hashlib.sha256((recipe / "configure.sh").read_bytes()).hexdigest())
    final = _hash("image", base, AGENT_LAYER_VERSION,
                  hashlib.sha256((recipe / "install-agent.sh").read_bytes()).hexdigest(),
                  _tree_digest(repo / "guest-agent", _agent_skip))
    return ImageKeys(bootstrap, base, final)


def image_key(repo: Path, mirror: str | None = None) -> tuple[str, str]:
    """(base_key, final_key) for the recipe and agent source in `repo`."""
    keys = image_keys(repo, mirror)
    return keys.base, keys.final


# ----------------------------------------------------------------------------- cache layout


def _image_dir(cache: Path, key: str) -> Path:
    return cache / "images" / key


def _load(cache: Path, key: str, built: bool = False) -> GuestImage | None:
    d = _image_dir(cache, key)
    img = GuestImage(key=key, disk=d / "disk.qcow2", kernel=d / "vmlinuz", initrd=d / "initrd.img",
                     ssh_key=d / "id_ed25519", cmdline=CMDLINE, built=built)
    needed = (d / "manifest.json", img.disk, img.kernel, img.initrd, img.ssh_key)
    return img if all(p.is_file() for p in needed) else None


def cached_image(repo: Path = REPO, cache_root: Path = DEFAULT_CACHE) -> GuestImage | None:
    """The image for `repo` if it is already built, without building anything."""
    return _load(Path(cache_root), image_keys(repo).final)


# ----------------------------------------------------------------------------- progress


class _StepFailed(Exception):
    pass


@dataclass
class _Build:
    """Stage bookkeeping: progress display, the build log, timings, errors with stage + log."""

    log: Path
    progress: ProgressArg
    timings: dict[str, float] = field(default_factory=dict)
    _own: Any = None
    _task: Any = None
    _stage: str = ""

    def __enter__(self) -> _Build:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log, "a", buffering=1)
        if self.progress is None:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._own = Progress(SpinnerColumn(finished_text="[green]✓"),
                                 TextColumn("{task.description:<14}"), TimeElapsedColumn(),
                                 TextColumn("[dim]{task.fields[note]}"),
                                 console=Console(stderr=True), transient=False)
            self._own.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.stop()
        self._log.close()

    @property
    def _rich(self) -> Any:
        if self._own is not None:
            return self._own
        if self.progress is not None and hasattr(self.progress, "add_task"):
            return self.progress
        return None

    def write(self, text: str) -> None:
        self._log.write(text if text.endswith("\n") else text + "\n")

    def note(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if self._rich is not None and self._task is not None:
            self._show(note=text[:70])
        elif callable(self.progress):
            self.progress(f"[{self._stage}] {text}")

    def _show(self, note: str, description: str | None = None, **kw: Any) -> None:
        """Our own display has a note column; a caller's Progress shows the note in the description."""
        description = description or self._stage
        if self._own is not None:
            self._rich.update(self._task, description=description, note=note, **kw)
        else:
            from rich.markup import escape

            self._rich.update(self._task, description=f"{description}  [dim]{escape(note)}[/]", **kw)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._stage, t0 = name, time.monotonic()
        self.write(f"\n=== {name} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
        if self._rich is not None:
            self._task = self._rich.add_task(name, total=1, note="")
        elif callable(self.progress):
            self.progress(f"[{name}] started")
        try:
            yield
        except ImageBuildError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure names its stage and the log
            self.write(f"!!! {name} failed: {e}")
            if self._rich is not None and self._task is not None:
                self._show("failed", description=f"[red]{name}[/]")
                self._rich.stop_task(self._task)
            raise ImageBuildError(f"guest image build failed at stage '{name}': {e} (log: {self.log})",
                                  f"see {self.log}; a second run reuses the layers already built"
                                  ) from None
        dt = time.monotonic() - t0
        self.timings[name] = round(dt, 1)
        self.write(f"=== {name} done in {dt:.1f} s")
        if self._rich is not None and self._task is not None:
            self._show(f"{dt:.1f} s", completed=1)
            self._rich.stop_task(self._task)
        elif callable(self.progress):
            self.progress(f"[{name}] done in {dt:.1f} s")
        self._task = None

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            watch: Callable[[str], str | None] | None = None) -> None:
        """Run a command, its output to the log; `watch` maps a line to a status note (or None)."""
        self.write(f"$ {shlex.join(map(str, argv))}")
        try:
            proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                    errors="replace", env=env or _host_env(), cwd=cwd)
        except FileNotFoundError:
            raise _StepFailed(f"{argv[0]} not found") from None
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            self._log.write(line)
            if line.strip():
                tail = (tail + [line.strip()])[-3:]
            if watch is not None:
                note = watch(line)
                if note:
                    self.note(note)
        rc = proc.wait()
        if rc != 0:
            last = tail[-1] if tail else "no output"
            raise _StepFailed(f"{Path(str(argv[0])).name} exited {rc}: {last}")


def _host_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _chroot_env(**extra: str) -> dict[str, str]:
    """A clean environment for commands in the guest rootfs: nothing of the host's leaks in."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
            "TERM": "dumb", **extra}


# ----------------------------------------------------------------------------- fs helpers


def _mounts_under(path: Path) -> list[Path]:
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == root or mnt.startswith(root + "/"):
                found.append(Path(mnt))
    return sorted(found, key=lambda p: len(p.as_posix()), reverse=True)


def _release(path: Path) -> None:
    """Unmount whatever a (killed) build left mounted under `path`, then remove it.

    `rm --one-file-system` never follows a mount it could not release into the host's /dev or /proc.
    """
    if not path.exists() and not path.is_symlink():
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def _chroot_mounts(rootfs: Path) -> Iterator[None]:
    proc = rootfs / "proc"
    proc.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True, capture_output=True)
    try:
        yield
    finally:
        if subprocess.run(["umount", str(proc)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(proc)], capture_output=True)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy overlay files into the rootfs: root-owned, modes kept, directories created 0755."""
    for dirpath, dirnames, filenames in os.walk(src):
        d = Path(dirpath)
        target = dst / d.relative_to(src)
        if not target.is_dir():
            target.mkdir(mode=0o755, parents=True)
            os.chown(target, 0, 0)
        for n in sorted(filenames):
            s, t = d / n, target / n
            if t.is_symlink() or t.exists():
                t.unlink()
            if s.is_symlink():
                os.symlink(os.readlink(s), t)
            else:
                shutil.copy2(s, t)
                os.chmod(t, 0o755 if os.stat(s).st_mode & 0o111 else 0o644)
            os.lchown(t, 0, 0)


def _used_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def _workdir(tmp: Path, prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    d.chmod(0o755)  # published as is: QEMU (libvirt-qemu) must read the image files
    return d


def _publish(tmp: Path, dest: Path, trash: Path) -> None:
    """Rename a finished layer into place atomically (moving an old one aside first)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        old = trash / f"old-{dest.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(dest, old)
        _release(old)
    os.rename(tmp, dest)


def _prune(layer_dir: Path, keep: int, current: str) -> None:
    if not layer_dir.is_dir():
        return
    done = [d for d in layer_dir.iterdir() if (d / "manifest.json").is_file() and d.name != current]
    done.sort(key=lambda d: (d / "manifest.json").stat().st_mtime, reverse=True)
    for d in done[max(0, keep - 1):]:
        _release(d)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _kernel_files(rootfs: Path) -> tuple[Path, Path, str]:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"),
                     key=lambda p: [int(x) if x.isdigit() else x
                                    for x in re.split(r"(\d+)", p.name)])
    if not kernels:
        raise _StepFailed(f"no kernel in {rootfs / 'boot'}")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise _StepFailed(f"no initrd for kernel {version}")
    return kernels[-1], initrd, version


def _write_manifest(d: Path, **data: Any) -> None:
    (d / "manifest.json").write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- layers


def _debootstrap_note(line: str) -> str | None:
    line = line.strip()
    if line.startswith(("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking",
                        "I: Configuring", "I: Installing", "I: Resolving", "I: Checking",
                        "I: Base system")):
        return line[3:]
    return None


def _build_bootstrap(b: _Build, cache: Path, tmp: Path, keys: ImageKeys, repo: Path,
                     mirror: str) -> Path:
    dest = cache / "bootstrap" / keys.bootstrap
    packages = read_packages(recipe_dir(repo) / "packages.txt")
    with b.stage("debootstrap"):
        work = _workdir(tmp, "bootstrap-")
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        b.note(f"{len(packages)} packages from {mirror}")
        b.run(["debootstrap", f"--variant={VARIANT}", "--components=main",
               f"--include={','.join(packages)}", f"--cache-dir={debs}",
               SUITE, work / "rootfs", mirror], watch=_debootstrap_note)
        b.note("cleaning apt caches")
        b.run(["chroot", work / "rootfs", "apt-get", "clean"], env=_chroot_env())
        _write_manifest(work, key=keys.bootstrap, mirror=mirror, suite=SUITE, packages=packages,
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _publish(work, dest, tmp)
    return dest


def _build_base(b: _Build, cache: Path, tmp: Path, keys: ImageKeys, repo: Path,
                bootstrap: Path) -> Path:
    dest = cache / "base" / keys.base
    recipe = recipe_dir(repo)
    with b.stage("configure"):
        work = _workdir(tmp, "base-")
        rootfs = work / "rootfs"
        b.note("copying the debootstrap rootfs")
        b.run(["cp", "-a", bootstrap / "rootfs", rootfs])
        b.note("overlay")
        _copy_tree(recipe / "overlay", rootfs)
        shutil.copy(recipe / "configure.sh", rootfs / "root" / "neuraos-configure.sh")
        with _chroot_mounts(rootfs):
            b.run(["chroot", rootfs, "/bin/sh", "/root/neuraos-configure.sh"], env=_chroot_env(),
                  watch=lambda line: line.strip()[:70] if not line.startswith(" ") else None)
        (rootfs / "root" / "neuraos-configure.sh").unlink()
        _write_manifest(work, key=keys.base, bootstrap=keys.bootstrap,
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _publish(work, dest, tmp)
    return dest


def _python(repo: Path) -> str:
    venv = Path(repo) / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _build_wheels(b: _Build, repo: Path, work: Path, guest_python: str) -> Path:
    """The agent's wheel and its dependencies' wheels (for the guest's CPython) in work/wheels."""
    py = _python(repo)
    wheels, src = work / "wheels", work / "agent-src"
    with b.stage("agent wheels"):
        b.note("generating link stubs")
        b.run([py, "-m", "hypervisor.link.protogen"], cwd=repo)
        shutil.copytree(Path(repo) / "guest-agent", src,
                        ignore=lambda d, names: [n for n in names if n in ("build", "dist",
                                                 "__pycache__") or n.endswith(".egg-info")])
        pip = [py, "-m", "pip", "--disable-pip-version-check"]
        host_py = subprocess.run([py, "-c", "import sys;print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        b.note("pip wheel ./guest-agent")
        if host_py == guest_python:
            # same CPython ABI as the guest: pip can also build any sdist-only dependency
            b.run(pip + ["wheel", "--wheel-dir", wheels, src],
                  watch=lambda l: l.strip()[:70] if l.startswith(("Collecting", "Building",
                                                                  "Saved")) else None)
        else:
            b.run(pip + ["wheel", "--no-deps", "--wheel-dir", wheels, src])
            agent = next(wheels.glob("neuraos_agent-*.whl"))
            b.run(pip + ["download", "--dest", wheels, "--only-binary=:all:",
                         "--platform", "manylinux_2_36_x86_64", "--implementation", "cp",
                         "--python-version", guest_python, agent])
        shutil.rmtree(src)
    return wheels


def _build_image(b: _Build, cache: Path, tmp: Path, keys: ImageKeys, repo: Path,
                 base: Path) -> Path:
    dest = _image_dir(cache, keys.final)
    recipe = recipe_dir(repo)
    work = _workdir(tmp, "image-")
    rootfs = work / "rootfs"
    guest_python = _guest_python(base / "rootfs")
    wheels = _build_wheels(b, repo, work, guest_python)

    with b.stage("agent venv"):
        b.note("copying the base rootfs")
        b.run(["cp", "-a", base / "rootfs", rootfs])
        inside = Path("/root/neuraos-wheels")
        shutil.copytree(wheels, rootfs / inside.relative_to("/"))
        shutil.copy(recipe / "install-agent.sh", rootfs / "root" / "neuraos-install-agent.sh")
        b.note("pip install in the guest rootfs")
        with _chroot_mounts(rootfs):
            b.run(["chroot", rootfs, "/bin/sh", "/root/neuraos-install-agent.sh"],
                  env=_chroot_env(WHEELS=str(inside)),
                  watch=lambda l: l.strip()[:70] if l.startswith(("Processing", "Installing",
                                                                  "Successfully", "I:")) else None)
        shutil.rmtree(rootfs / inside.relative_to("/"))
        (rootfs / "root" / "neuraos-install-agent.sh").unlink()

        b.note("root's ssh key")
        key = work / "id_ed25519"
        b.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@neuraos-{keys.final}",
               "-f", key])
        os.chmod(key, 0o600)
        ssh_dir = rootfs / "root" / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text((work / "id_ed25519.pub").read_text())
        os.chmod(ssh_dir, 0o700)
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        # /etc and /var are up to date with /usr: no ConditionNeedsUpdate= work at first boot
        for d in ("etc", "var"):
            (rootfs / d / ".updated").write_text("# written by the NeuraOS image build\n")
        now = time.time() + 1
        for d in ("etc", "var"):
            os.utime(rootfs / d / ".updated", (now, now))

    with b.stage("disk"):
        kernel, initrd, kver = _kernel_files(rootfs)
        shutil.copy(kernel, work / "vmlinuz")
        shutil.copy(initrd, work / "initrd.img")
        for f in ("vmlinuz", "initrd.img", "id_ed25519.pub"):
            os.chmod(work / f, 0o644)
        used = _used_bytes(rootfs)
        size = max(MIN_DISK_BYTES, -(-(used + HEADROOM_BYTES) // (256 << 20)) * (256 << 20))
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
        b.note(f"mkfs.ext4 -d ({used / 2**30:.2f} GiB used, {size / 2**30:.2f} GiB file system)")
        b.run(["mkfs.ext4", "-q", "-F", "-L", "neuraos-root", "-m", "1",
               "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", rootfs, raw])
        b.note("qemu-img convert -O qcow2")
        b.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, work / "disk.qcow2"])
        raw.unlink()
        os.chmod(work / "disk.qcow2", 0o644)
        _release(rootfs)
        shutil.rmtree(wheels, ignore_errors=True)
        _write_manifest(work, key=keys.final, base=keys.base, bootstrap=keys.bootstrap,
                        kernel_version=kver, cmdline=CMDLINE, fs_bytes=size, used_bytes=used,
                        disk_bytes=(work / "disk.qcow2").stat().st_size,
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), timings=b.timings)
        _publish(work, dest, tmp)
    # the disk stage's own time, now that it is known
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["timings"] = b.timings
    (dest / "manifest.json.new").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(dest / "manifest.json.new", dest / "manifest.json")
    return dest


def _guest_python(rootfs: Path) -> str:
    versions = sorted(p.name.removeprefix("python") for p in (rootfs / "usr" / "bin").glob("python3.*")
                      if re.fullmatch(r"python3\.\d+", p.name))
    if not versions:
        raise ImageBuildError(f"no python3 in {rootfs}", "python3 must be in packages.txt")
    return versions[-1]


def _check_host() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building the guest image needs root (debootstrap, chroot, mount)",
                              "run it as root, or use an image cache someone already built")
    env_path = _host_env()["PATH"]
    missing = [t for t in ("debootstrap", "chroot", "mkfs.ext4", "qemu-img", "ssh-keygen", "mount")
               if shutil.which(t, path=env_path) is None]
    if missing:
        raise ImageBuildError(f"missing tools for the image build: {', '.join(missing)}",
                              "install debootstrap qemu-utils e2fsprogs openssh-client "
                              "(or run `bash .ci/setup`)")


# ----------------------------------------------------------------------------- public entry


def ensure_image(repo: Path = REPO, cache_root: Path = DEFAULT_CACHE,
                 progress: ProgressArg = None, rebuild: bool = False) -> GuestImage:
    """The guest image for `repo`'s recipe and agent source, built if it is not cached.

    `progress`: None shows rich progress on stderr while building; a rich `Progress` gets one
    task per stage; a callable gets one line per event. `rebuild` rebuilds every layer.
    Raises ImageBuildError (naming the stage and the build log) when a build fails.
    """
    repo, cache = Path(repo), Path(cache_root)
    keys = image_keys(repo)
    if not rebuild and (img := _load(cache, keys.final)) is not None:
        return img
    _check_host()
    with _locked(cache):
        if not rebuild and (img := _load(cache, keys.final)) is not None:
            return img  # another process built it while we waited for the lock
        tmp = cache / "tmp"
        _release(tmp)  # whatever killed builds left behind
        tmp.mkdir(parents=True, exist_ok=True)
        log = cache / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{keys.final}.log"
        try:
            with _Build(log, progress) as b:
                b.write(f"NeuraOS guest image build: keys {asdict(keys)}")
                mirror = find_mirror()
                bootstrap = cache / "bootstrap" / keys.bootstrap
                if rebuild or not (bootstrap / "manifest.json").is_file():
                    bootstrap = _build_bootstrap(b, cache, tmp, keys, repo, mirror)
                base = cache / "base" / keys.base
                if rebuild or not (base / "manifest.json").is_file():
                    base = _build_base(b, cache, tmp, keys, repo, bootstrap)
                _build_image(b, cache, tmp, keys, repo, base)
                latest = cache / "logs" / "latest.log"
                with contextlib.suppress(OSError):
                    latest.unlink(missing_ok=True)
                    latest.symlink_to(log.name)
        finally:
            _release(tmp)
        shutil.copy(log, _image_dir(cache, keys.final) / "build.log")
        _prune(cache / "images", KEEP_IMAGES, keys.final)
        _prune(cache / "base", KEEP_BASES, keys.base)
        _prune(cache / "bootstrap", KEEP_BASES, keys.bootstrap)
    img = _load(cache, keys.final, built=True)
    if img is None:  # pragma: no cover - _build_image publishes all of these
        raise ImageBuildError(f"image {keys.final} incomplete after build (log: {log})")
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hypervisor.virt.image",
                                 description="Build (or find cached) the NeuraOS guest image.")
    ap.add_argument("--rebuild", action="store_true", help="rebuild every layer")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache root ({DEFAULT_CACHE})")
    ap.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        img = ensure_image(args.repo, args.cache, progress=None, rebuild=args.rebuild)
    except ImageBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - t0
    manifest = json.loads((img.disk.parent / "manifest.json").read_text())
    result = {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(img).items()},
              "seconds": round(elapsed, 3), "disk_bytes": img.disk.stat().st_size,
              "kernel_version": manifest.get("kernel_version"),
              "build_timings": manifest.get("timings", {})}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"image   {img.key} ({'built' if img.built else 'cached'} in {elapsed:.2f} s)")
        for k in ("disk", "kernel", "initrd", "ssh_key"):
            print(f"{k:<7} {result[k]}")
        print(f"cmdline {img.cmdline}")
        print(f"size    {result['disk_bytes'] / 2**20:.0f} MiB qcow2")
        if img.built:
            print("stages  " + ", ".join(f"{k} {v:.1f} s" for k, v in result["build_timings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
