#!/usr/bin/env python3
"""vmvault against restic and borg on one synthetic disk image, and against this machine's limits.

  python3 bench/run.py [--size 4G] [--workdir DIR] [--json FILE] [--skip-peers] [--keep]
                       [--formats qcow2,vhdx,vhd,vmdk] [--storage garage,azurite]

In one run, on the same image made by ../shared/bench/mkimage.py, each tool does a full backup,
a backup after 1% of the image changed, and a restore of the changed image. The markdown report on
stdout gives throughput (MB/s of logical image size, MB = 10^6 bytes), stored bytes (repository
size after the full backup, and what the incremental added) and vmvault/peer ratios. It then runs
`vmvault-primitives` (crates/bench) for the per-core speed of each step a backup is made of, and
says how close the tools come to the pipeline bound those speeds imply. Progress goes to stderr.

Options for development: --skip-vmvault measures only the peers and primitives (before the
vmvault CLI exists); --vmvault-bin PATH uses that binary instead of building one.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MKIMAGE = REPO.parent / "shared" / "bench" / "mkimage.py"
MIB = 1 << 20
PASSWORD = "bench"
VM_NAME = "bench"
DISK_NAME = "os"

VM_TOML = f"""name = "{VM_NAME}"
cpus = 1
memory_mib = 512
firmware = "bios"

[[disks]]
name = "{DISK_NAME}"
path = "disk.raw"
format = "raw"
bus = "virtio"
"""


class BenchError(Exception):
    pass


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def tail(text, lines=40):
    rows = text.decode(errors="replace").rstrip().splitlines()
    return "\n".join(rows[-lines:])


def run(cmd, *, env=None, cwd=None, capture=True):
    """Runs cmd and returns (wall seconds, user+sys CPU seconds, stdout bytes).

    The child gets its own session and no stdin: a tool that falls back to asking for a
    password on /dev/tty then fails at once instead of hanging the benchmark.
    """
    cmd = [str(c) for c in cmd]
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = subprocess.PIPE if capture else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=out, start_new_session=True)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        # Its own session means ^C reaches only us; take the tool down with us.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        message = f"command failed (exit {proc.returncode}): {' '.join(cmd)}"
        if cwd:
            message += f"\n  in {cwd}"
        if capture:
            if stderr.strip():
                message += f"\n--- stderr ---\n{tail(stderr)}"
            if stdout.strip():
                message += f"\n--- stdout ---\n{tail(stdout)}"
        raise BenchError(message)
    return seconds, cpu, stdout or b""


def output(cmd, env=None):
    return run(cmd, env=env)[2].decode(errors="replace")


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def du(path):
    return int(output(["du", "-sb", path]).split()[0])


def warm(*paths):
    """Reads files (or every file under directories) once so the timed step starts warm."""
    buf = bytearray(MIB)
    for path in paths:
        files = [Path(path)] if Path(path).is_file() else \
            sorted(p for p in Path(path).rglob("*") if p.is_file())
        for name in files:
            with open(name, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def prefault():
    """Touches most of the free memory once, then frees it.

    On this project's virtual machines the first touch of a guest page costs a fault in the
    hypervisor: a backup writing gigabytes of new page cache right after boot ran 1.7x slower
    than the same backup a little later. Whichever tool ran first paid that alone (vmvault, as
    it happens). Touching memory before each tool puts every tool in the same state.
    """
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    n = int(avail * 0.6) // 4096 * 4096
    if n <= 0:
        return
    block = bytearray(n)
    block[::4096] = b"\x01" * (n // 4096)
    del block


def settle():
    # Writes left dirty by the previous step would otherwise be flushed during the next one.
    os.sync()


def sparse_copy(src, dst):
    run(["cp", "--sparse=always", src, dst])


def identical(a, b):
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def is_sparse(path):
    st = os.stat(path)
    return st.st_blocks * 512 < st.st_size


class Tool:
    """One backup program: a repository, full and incremental backups of one image, a restore."""

    name = ""
    env = {}

    def __init__(self, work, images):
        self.work = work
        self.images = images  # {"full": original image, "incremental": mutated image}
        self.repo = work / f"{self.name}-repo"
        self.notes = []

    def version(self):
        raise NotImplementedError

    def init(self):
        raise NotImplementedError

    def prepare(self, step):
        """Returns the path the backup of `step` reads, after putting the right image there."""
        raise NotImplementedError

    def backup(self, step):
        raise NotImplementedError

    def restore(self, out):
        """Restores the latest backup into directory `out`; returns the restored image's path."""
        raise NotImplementedError

    def run(self, cmd, cwd=None):
        return run(cmd, env=self.env, cwd=cwd)

    def scratch(self):
        """What to delete once this tool is measured, to keep a 4 GiB run's peak disk use down."""
        return [self.repo]


class Vmvault(Tool):
    name = "vmvault"
    env = {"VMVAULT_PASSWORD": PASSWORD}

    def __init__(self, work, images, binary, chunk_size=None):
        super().__init__(work, images)
        self.binary = binary
        self.chunk_size = chunk_size

    def version(self):
        try:
            return output([self.binary, "--version"], env=self.env).strip()
        except BenchError:
            return "vmvault (no --version)"

    def init(self):
        extra = ["--chunk-size", self.chunk_size] if self.chunk_size else []
        self.run([self.binary, "vault", "create", self.repo, *extra])
        self.notes.append("encrypted vault, " + (f"chunk size {self.chunk_size}"
                                                 if self.chunk_size else "default settings"))

    def prepare(self, step):
        # Two folders, each a VM description next to its disk, both naming the VM "bench":
        # the second backup is then an incremental of the first.
        return self.images[step]

    def backup(self, step):
        return self.run([self.binary, "backup", "--vault", self.repo,
                         self.images[step].parent / "vm.toml"])

    def restore(self, out):
        target = out / "disk.raw"
        timing = self.run([self.binary, "restore", "--vault", self.repo, f"{VM_NAME}@latest",
                           "--disk", DISK_NAME, "--to", target])
        return timing, target


class Peer(Tool):
    """A file backup tool fed the image at one fixed path, whose content is swapped between
    backups so that the second run is an incremental of the first, as it would be for a VM."""

    def __init__(self, work, images):
        super().__init__(work, images)
        self.source_dir = work / f"{self.name}-source"
        self.source_dir.mkdir()
        self.source = self.source_dir / "disk.raw"

    def prepare(self, step):
        sparse_copy(self.images[step], self.source)
        return self.source

    def scratch(self):
        return [self.repo, self.source_dir]


class Restic(Peer):
    name = "restic"

    def __init__(self, work, images):
        super().__init__(work, images)
        self.env = {"RESTIC_PASSWORD": PASSWORD,
                    "RESTIC_CACHE_DIR": str(work / "cache" / "restic")}
        self.help_restore = output(["restic", "restore", "--help"])

    def version(self):
        return output(["restic", "version"]).strip()

    def init(self):
        cmd = ["restic", "init", "--repo", self.repo]
        if "--repository-version" in output(["restic", "init", "--help"]):
            # Format 2 is the one with compression; its default mode "auto" is zstd.
            cmd += ["--repository-version", "2"]
            self.notes.append("repository format 2, default compression (auto = zstd)")
        else:
            self.notes.append("repository format 1 (this restic cannot compress)")
        self.run(cmd)

    def backup(self, step):
        return self.run(["restic", "backup", "--repo", self.repo, self.source])

    def restore(self, out):
        cmd = ["restic", "restore", "latest", "--repo", self.repo, "--target", out]
        if "--sparse" in self.help_restore:
            cmd.append("--sparse")
            self.notes.append("restore --sparse")
        else:
            self.notes.append("this restic cannot restore sparse files")
        timing = self.run(cmd)
        found = [p for p in out.rglob("disk.raw") if p.is_file()]
        if len(found) != 1:
            raise BenchError(f"restic restore: expected one disk.raw under {out}, found {found}")
        return timing, found[0]


class Borg(Peer):
    name = "borg"

    def __init__(self, work, images):
        super().__init__(work, images)
        self.env = {"BORG_PASSPHRASE": PASSWORD,
                    "BORG_DISPLAY_PASSPHRASE": "no",
                    "BORG_CACHE_DIR": str(work / "cache" / "borg"),
                    "BORG_CONFIG_DIR": str(work / "config" / "borg")}
        self.help_extract = output(["borg", "extract", "--help"])

    def version(self):
        return output(["borg", "--version"]).strip()

    def init(self):
        self.run(["borg", "init", "-e", "repokey", self.repo])
        self.notes.append("-e repokey (AES-CTR, HMAC-SHA256 chunk ids), default compression "
                          "(lz4), default chunker (buzhash)")

    def backup(self, step):
        archive = {"full": "a", "incremental": "b"}[step]
        # A relative path, so that extract recreates it as out/disk.raw.
        return self.run(["borg", "create", f"{self.repo}::{archive}", "disk.raw"],
                        cwd=self.source_dir)

    def restore(self, out):
        cmd = ["borg", "extract"]
        if "--sparse" in self.help_extract:
            cmd.append("--sparse")
            self.notes.append("extract --sparse")
        timing = self.run(cmd + [f"{self.repo}::b"], cwd=out)
        return timing, out / "disk.raw"


def measure(tool, size, keep):
    """Full backup, incremental, restore; every step starts with flushed writes and a warm input."""
    log(f"{tool.name}: {tool.version()}")
    prefault()
    tool.init()
    empty = du(tool.repo)
    result = {"version": tool.version(), "empty_repo_bytes": empty}
    stored_before = empty
    for step in ("full", "incremental"):
        source = tool.prepare(step)
        prefault()
        settle()
        warm(source)
        log(f"{tool.name}: {step} backup")
        seconds, cpu, _ = tool.backup(step)
        stored = du(tool.repo)
        result[step] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                        "mbps": round(size / seconds / 1e6, 1), "stored_bytes": stored,
                        "added_bytes": stored - stored_before}
        stored_before = stored
        log(f"{tool.name}: {step} backup {seconds:.1f} s, repository {stored / 1e6:.0f} MB")
    out = tool.work / f"{tool.name}-restore"
    out.mkdir()
    prefault()
    settle()
    warm(tool.repo)
    log(f"{tool.name}: restore")
    (seconds, cpu, _), restored = tool.restore(out)
    if not restored.is_file():
        raise BenchError(f"{tool.name} restore: {restored} was not created")
    same = identical(restored, tool.images["incremental"])
    st = os.stat(restored)
    result["restore"] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                         "mbps": round(size / seconds / 1e6, 1), "identical": same,
                         "sparse": is_sparse(restored), "allocated_bytes": st.st_blocks * 512}
    log(f"{tool.name}: restore {seconds:.1f} s, identical: {same}, sparse: {is_sparse(restored)}")
    if not same:
        log(f"WARNING: {tool.name} restored an image that differs from the one backed up")
    if not keep:
        for path in [out, *tool.scratch()]:
            shutil.rmtree(path)
    result["notes"] = tool.notes
    return result


def measure_formats(binary, image, formats, work, keep):
    """A full vmvault backup of the same content as raw and as each image format.

    Each into a fresh vault, from a warm source: the figure is how much reading the format
    costs against reading the raw file (the image-formats issue asks for at least 80%).
    Nothing is deleted until every run is done: creating files right after thousands were
    deleted costs several times more on this machine's filesystem, which would slow each run
    by the one before it. Raw runs first and last; the faster of the two is the baseline.
    """
    results = {}
    size = os.path.getsize(image)
    folders = []
    prefault()
    for n, fmt in enumerate(["raw", *formats, "raw"]):
        folder = work / f"format-{n}-{fmt}"
        folder.mkdir()
        folders.append(folder)
        qemu_fmt = {"vhd": "vpc"}.get(fmt, fmt)
        disk = folder / f"disk.{fmt}"
        if fmt == "raw":
            sparse_copy(image, disk)
        else:
            log(f"formats: qemu-img convert -O {qemu_fmt}")
            run(["qemu-img", "convert", "-f", "raw", "-O", qemu_fmt, image, disk])
        (folder / "vm.toml").write_text(VM_TOML.replace('"disk.raw"', f'"{disk.name}"')
                                        .replace('format = "raw"', f'format = "{fmt}"'))
        vault = folder / "vault"
        env = {"VMVAULT_PASSWORD": PASSWORD}
        run([binary, "vault", "create", vault], env=env)
        settle()
        warm(disk)
        seconds, cpu, _ = run([binary, "backup", "--vault", vault, folder / "vm.toml"], env=env)
        r = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
             "mbps": round(size / seconds / 1e6, 1), "image_bytes": os.stat(disk).st_blocks * 512}
        log(f"formats: {fmt} full backup {seconds:.1f} s")
        if fmt in results and results[fmt]["mbps"] >= r["mbps"]:
            continue
        results[fmt] = r
    if not keep:
        for folder in folders:
            shutil.rmtree(folder)
    return results


def tree_cpu(root):
    """CPU seconds used so far by process `root` and all its descendants (the storage server)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


def measure_storage(binary, server_bin, image, kinds, work, keep):
    """Full backup and restore of the same image into a local-directory vault and into each
    object store (servers on 127.0.0.1, started by `vmvault-test-server`), as ratios to local.

    The object-storage issue asks for at least half the local throughput, both ways. Local runs
    first and last; the faster counts."""
    results = {}
    size = os.path.getsize(image)
    folder = image.parent
    for n, kind in enumerate(["local", *kinds, "local"]):
        server = None
        env = {"VMVAULT_PASSWORD": PASSWORD, "VMVAULT_STATE_DIR": str(work / "state")}
        try:
            if kind == "local":
                vault, options = str(work / f"storage-{n}-vault"), []
            else:
                server = subprocess.Popen([server_bin, kind], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True)
                line = server.stdout.readline()
                if not line:
                    raise BenchError(f"{kind}: the test server did not start (is it installed? "
                                     "scripts/test installs garage, moto and azurite)")
                info = json.loads(line)
                vault, options = info["url"] + f"bench-{n}", info["options"]
                env.update(info["env"])
            run([binary, "vault", "create", vault, *options], env=env)
            # Every run on memory the guest has touched: first-touch faults in this VM cost a
            # restore's page-cache writes a second per GiB, whichever storage it reads.
            prefault()
            settle()
            warm(image)
            log(f"storage: {kind} full backup")
            server_cpu = tree_cpu(server.pid) if server else 0.0
            seconds, cpu, _ = run([binary, "backup", "--vault", vault, *options,
                                   folder / "vm.toml"], env=env)
            backup_server_cpu = (tree_cpu(server.pid) if server else 0.0) - server_cpu
            out = work / f"storage-{n}-restore.raw"
            prefault()
            settle()
            log(f"storage: {kind} restore")
            server_cpu = tree_cpu(server.pid) if server else 0.0
            rseconds, rcpu, _ = run([binary, "restore", "--vault", vault, *options,
                                     f"{VM_NAME}@latest", "--disk", DISK_NAME, "--to", out],
                                    env=env)
            restore_server_cpu = (tree_cpu(server.pid) if server else 0.0) - server_cpu
            same = identical(out, image)
            os.unlink(out)
            if kind == "local" and not keep:
                shutil.rmtree(vault)
            # The same backup run by `vmvault server` into the same storage (S3 only: the
            # server's path is the one the agents will use).
            served = None
            if server and info["url"].startswith("s3://"):
                served = server_backup(binary, info["url"] + f"bench-server-{n}", options, env,
                                       image, work / f"server-{n}")
        finally:
            if server:
                server.stdin.close()
                server.wait(timeout=60)
        r = {"backup_seconds": round(seconds, 3), "backup_mbps": round(size / seconds / 1e6, 1),
             "backup_cpu_seconds": round(cpu, 3),
             "backup_server_cpu_seconds": round(backup_server_cpu, 3),
             "restore_seconds": round(rseconds, 3),
             "restore_mbps": round(size / rseconds / 1e6, 1), "restore_cpu_seconds": round(rcpu, 3),
             "restore_server_cpu_seconds": round(restore_server_cpu, 3), "identical": same}
        if served:
            r["server_run"] = served
            log(f"storage: {kind} backup run by vmvault server {served['backup_seconds']:.1f} s "
                f"({served['backup_seconds'] and seconds / served['backup_seconds']:.2f} of the "
                "CLI's speed)")
        log(f"storage: {kind} backup {seconds:.1f} s, restore {rseconds:.1f} s, identical: {same}")
        if kind in results and results[kind]["backup_mbps"] >= r["backup_mbps"]:
            continue
        results[kind] = r
    return results


def server_backup(binary, vault, options, env, image, state):
    """A full backup of `image` run by `vmvault server` (a job, asked for and waited on through
    the CLI's remote `backup --wait`) into a new vault at `vault`: seconds and CPU seconds of the
    server process (the storage server's are not in them)."""
    folder = image.parent
    server_env = dict(os.environ)
    server_env.update(env)
    server_env["VMVAULT_SERVER_STATE"] = str(state)
    server_env.pop("VMVAULT_VAULT", None)
    proc = subprocess.Popen([str(binary), "server", "--listen", "127.0.0.1:0", "--insecure-http",
                             "--disk-root", str(folder), "--vault", vault, *options],
                            env=server_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url, said = None, []
        for line in proc.stderr:
            said.append(line.rstrip())
            if line.startswith("vmvault server: listening on "):
                url = line.split("listening on ", 1)[1].strip()
                break
        if not url:
            raise BenchError("vmvault server did not start:\n" + "\n".join(said[-20:]))
        # Keep reading what it says so that it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        remote = [binary, "--server", url, "--token", f"@{state / 'admin-token'}"]
        run([*remote, "policy", "create", "bench", "--schedule", "daily 02:00",
             "--keep-daily", "7"], env=env)
        run([*remote, "protect", folder / "vm.toml", "--policy", "bench"], env=env)
        prefault()
        settle()
        warm(image)
        log("storage: the same backup run by vmvault server")
        before = tree_cpu(proc.pid)
        seconds, _, _ = run([*remote, "backup", VM_NAME, "--wait"], env=env)
        cpu = tree_cpu(proc.pid) - before
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    size = os.path.getsize(image)
    return {"backup_seconds": round(seconds, 3), "backup_mbps": round(size / seconds / 1e6, 1),
            "backup_cpu_seconds": round(cpu, 3)}


def measure_live(binary, image, work):
    """`restore --live` of the full image into a paused QEMU (TCG, no guest OS: its firmware
    reads the boot disk as soon as it runs): seconds from the command to the VM's first disk read
    being served, and until the disk is all local; against a plain restore of the same point."""
    qemu = output([REPO / "scripts" / "install-qemu"]).strip()
    fw = Path(qemu).parents[3] / "fw"
    env = {"VMVAULT_PASSWORD": PASSWORD, "VMVAULT_STATE_DIR": str(work / "state")}
    folder = work / "live"
    folder.mkdir()
    disk = folder / "disk.raw"
    sparse_copy(image, disk)
    with open(disk, "r+b") as f:  # a boot sector, so the firmware reads the disk at once
        f.seek(510)
        f.write(b"\x55\xaa")
    (folder / "vm.toml").write_text(VM_TOML)
    vault = folder / "vault"
    run([binary, "vault", "create", vault], env=env)
    run([binary, "backup", "--vault", vault, folder / "vm.toml"], env=env)
    prefault()
    settle()
    plain, _, _ = run([binary, "restore", "--vault", vault, f"{VM_NAME}@latest", "--disk",
                       DISK_NAME, "--to", folder / "plain.raw"], env=env)
    qmp = folder / "qmp.sock"
    vm = subprocess.Popen([qemu, "-L", fw, "-accel", "tcg", "-machine", "q35", "-m", "128",
                           "-display", "none", "-S", "-nodefaults", "-serial", "none",
                           "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
                           "-qmp", f"unix:{qmp},server=on,wait=off"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if qmp.exists():
                break
            time.sleep(0.1)
        prefault()
        settle()
        log("live: restore --live")
        seconds, _, out = run([binary, "restore", "--vault", vault, f"{VM_NAME}@latest",
                               "--disk", DISK_NAME, "--to", folder / "live.qcow2", "--live",
                               "--qmp", qmp, "--bus", "rp1", "--json"], env=env)
        r = json.loads(out)
    finally:
        vm.kill()
        vm.wait()
    result = {"attached_seconds": round(r["attached_seconds"], 3),
              "first_read_seconds": round(r["first_read_seconds"], 3),
              "all_local_seconds": round(r["seconds"], 3), "command_seconds": round(seconds, 3),
              "chunks_fetched": r["chunks_fetched"], "plain_restore_seconds": round(plain, 3)}
    log(f"live: first read served after {result['first_read_seconds']} s, all local after "
        f"{result['all_local_seconds']} s; plain restore {plain:.1f} s")
    return result


class Qmp:
    """Just enough QMP for the benchmark: commands, events skipped."""

    def __init__(self, path):
        import socket
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        self.file.readline()
        self.execute("qmp_capabilities")

    def execute(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise BenchError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def close(self):
        self.sock.close()


def mutation_runs(size, percent, seed):
    """The (offset, length) runs `mkimage.py mutate` writes, the same RNG draws in the same
    order (its bytes are random; the guest writes a pattern instead, which changes nothing
    about what has to be read)."""
    import random
    block = 4096
    rng = random.Random(seed)
    blocks = size // block
    target = int(blocks * percent / 100)
    changed, runs = 0, []
    while changed < target:
        count = min(rng.randint(1, 64), target - changed)
        start = rng.randrange(0, max(1, blocks - count))
        rng.randbytes(count * block)
        runs.append((start * block, count * block))
        changed += count
    return runs


def measure_running(binary, image, work, chunk_size=None):
    """A running QEMU VM (TCG; a qcow2 disk made from the benchmark's image): `backup --qmp`
    full, then 1% of the disk changed by guest writes (mkimage.py mutate's runs, written
    through the guest's device), then the incremental backup, which reads only the chunks the
    dirty bitmap marks."""
    qemu = output([REPO / "scripts" / "install-qemu"]).strip()
    fw = Path(qemu).parents[3] / "fw"
    env = {"VMVAULT_PASSWORD": PASSWORD, "VMVAULT_STATE_DIR": str(work / "state"),
           "VMVAULT_QEMU": qemu}
    folder = work / "running"
    folder.mkdir()
    disk = folder / "disk.qcow2"
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", image, disk])
    size = os.path.getsize(image)
    vault = folder / "vault"
    run([binary, "vault", "create", vault] + (["--chunk-size", chunk_size] if chunk_size else []),
        env=env)
    qmp, mon = folder / "qmp.sock", folder / "mon.sock"
    vm = subprocess.Popen([qemu, "-L", fw, "-accel", "tcg", "-machine", "q35", "-m", "128",
                           "-display", "none", "-nodefaults", "-serial", "none",
                           "-name", VM_NAME,
                           "-blockdev", f"driver=qcow2,node-name=drive0,file.driver=file,"
                                        f"file.filename={disk}",
                           "-device", "virtio-blk-pci,drive=drive0,id=vblk0",
                           "-qmp", f"unix:{qmp},server=on,wait=off",
                           "-qmp", f"unix:{mon},server=on,wait=off"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if mon.exists():
                break
            time.sleep(0.1)
        monitor = Qmp(mon)
        prefault()
        settle()
        log("running: full backup")
        full_s, full_cpu, out = run([binary, "backup", "--vault", vault, "--qmp", qmp,
                                     "--scratch", folder, "--json"], env=env)
        full = json.loads(out)
        runs = mutation_runs(size, 1.0, 2)
        log(f"running: the guest writes 1% of the disk ({len(runs)} runs)")
        for i, (offset, length) in enumerate(runs):
            monitor.execute("human-monitor-command", **{"command-line":
                            f'qemu-io -d vblk0/virtio-backend "write -P {i % 251} {offset} {length}"'})
        dirty = sum(b["count"] for d in monitor.execute("query-block")
                    for b in d.get("inserted", {}).get("dirty-bitmaps", [])
                    if b["name"].startswith("vmvault."))
        prefault()
        settle()
        log("running: incremental backup")
        incr_s, incr_cpu, out = run([binary, "backup", "--vault", vault, "--qmp", qmp,
                                     "--scratch", folder, "--json"], env=env)
        incr = json.loads(out)
        monitor.close()
    finally:
        vm.kill()
        vm.wait()
    changed = sum(length for _, length in runs)
    result = {"disk_bytes": size, "changed_bytes": changed, "dirty_bytes": dirty,
              "chunk_size": chunk_size or "1M",
              "full_seconds": round(full_s, 3), "full_cpu_seconds": round(full_cpu, 3),
              "full_bytes_read": full["stats"]["bytes_read"],
              "incremental_seconds": round(incr_s, 3),
              "incremental_cpu_seconds": round(incr_cpu, 3),
              "incremental_bytes_read": incr["stats"]["bytes_read"],
              "time_ratio": round(incr_s / full_s, 3)}
    log(f"running: full {full_s:.1f} s, incremental {incr_s:.2f} s "
        f"({result['time_ratio']:.3f} of full), read {incr['stats']['bytes_read'] / size:.2%}")
    return result


def measure_quiesce(binary, work, runs=5):
    """How long `backup --qmp --qga --scripts` keeps a real Linux guest (the quiesce tests'
    guest, scripts/make-qga-guest; TCG) frozen, with a quick pre- and post-script: the
    helper's freeze-to-thaw time the backup reports, over a few backups."""
    import re
    import socket
    qemu = output([REPO / "scripts" / "install-qemu"]).strip()
    fw = Path(qemu).parents[3] / "fw"
    guest = Path.home() / ".cache" / "vmvault" / "tools" / "qga-guest"
    run([REPO / "scripts" / "make-qga-guest", guest])
    env = {"VMVAULT_PASSWORD": PASSWORD, "VMVAULT_STATE_DIR": str(work / "state")}
    folder = work / "quiesce"
    (folder / "data").mkdir(parents=True)
    for name in ("pre.sh", "post.sh"):
        script = folder / "data" / name
        script.write_text("#!/bin/sh\nsync\n")
        script.chmod(0o755)
    disk = folder / "data.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", "-d", folder / "data", disk])
    (folder / "scripts.toml").write_text('[pre]\npath = "/mnt/pre.sh"\n'
                                         '[post]\npath = "/mnt/post.sh"\n')
    qmp, qga = folder / "qmp.sock", folder / "qga.sock"
    vm = subprocess.Popen([qemu, "-L", fw, "-accel", "tcg", "-machine", "q35", "-m", "512",
                           "-display", "none", "-nodefaults", "-name", "guest",
                           "-kernel", guest / "vmlinuz", "-initrd", guest / "initrd.gz",
                           "-append", "console=ttyS0 quiet",
                           "-blockdev", f"file,node-name=f0,filename={disk}",
                           "-blockdev", "raw,node-name=drive0,file=f0",
                           "-device", "virtio-blk-pci,drive=drive0,id=vda",
                           "-device", "virtio-serial-pci",
                           "-chardev", f"socket,path={qga},server=on,wait=off,id=qga0",
                           "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
                           "-qmp", f"unix:{qmp},server=on,wait=off"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    frozen = []
    try:
        deadline = time.monotonic() + 120
        while True:  # until the agent answers a guest-ping
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(str(qga))
                    s.sendall(b'{"execute":"guest-ping"}\n')
                    if b"return" in s.recv(4096):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError("the test guest's agent never answered")
            time.sleep(0.5)
        vault = folder / "vault"
        run([binary, "vault", "create", vault], env=env)
        for _ in range(runs):
            done = subprocess.run([str(c) for c in [
                binary, "backup", "--vault", vault, "--qmp", qmp, "--qga", qga, "--scripts",
                folder / "scripts.toml", "--scratch", folder, "--json"]],
                env={**os.environ, **env}, capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"backup failed: {tail(done.stderr)}")
            point = json.loads(done.stdout)
            if point["consistency"] != "application":
                raise BenchError(f"the guest was not quiesced: {point}")
            m = re.search(r"guest quiesced for (\d+) ms", done.stderr)
            if m:
                frozen.append(int(m.group(1)))
    finally:
        vm.kill()
        vm.wait()
    if not frozen:
        raise BenchError("no freeze time reported")
    frozen.sort()
    result = {"frozen_ms": frozen, "median_ms": frozen[len(frozen) // 2], "max_ms": frozen[-1]}
    log(f"quiesce: guest frozen {result['median_ms']} ms (median of {len(frozen)}), "
        f"at most {result['max_ms']} ms")
    return result


def quiesce_markdown(r):
    return "\n".join([
        "### Guest frozen during a backup", "",
        "`backup --qmp --qga --scripts` of the quiesce tests' Linux guest (TCG) with a quick "
        "pre- and post-script (`sync`): from the freeze to the thaw, as the backup reports it, "
        f"over {len(r['frozen_ms'])} backups.", "",
        "| median | max |", "|---:|---:|",
        f"| {r['median_ms']} ms | {r['max_ms']} ms |", ""])


def running_markdown(r):
    size = r["disk_bytes"]
    return "\n".join([
        "### Running VM: full and incremental backup", "",
        f"A running QEMU 7.2 VM (TCG) with a {size / 2**30:.0f} GiB qcow2 disk made from the "
        f"benchmark's image, vault chunk size {r['chunk_size']}; `backup --qmp` at one instant "
        "(image fleecing, NBD), each a whole command (vault opening included). Between the two "
        f"backups the guest writes {r['changed_bytes'] / size:.2%} of the disk in mkimage.py "
        "mutate's runs.", "",
        "| | seconds | read from the disk |", "|---|---:|---:|",
        f"| full backup | {r['full_seconds']:.2f} | {r['full_bytes_read'] / size:.1%} |",
        f"| incremental backup | {r['incremental_seconds']:.2f} | "
        f"{r['incremental_bytes_read'] / size:.1%} |",
        f"| incremental / full | **{r['time_ratio']:.3f}** | |", "",
        f"The dirty bitmap (64 KiB granularity) marked {r['dirty_bytes'] / size:.2%} of the disk; "
        "the backup reads those ranges, and takes the rest of each changed chunk from the "
        "previous point.", ""])


def measure_files(binary, work):
    """The single-file-restore issue's figure: a 20 GiB disk with three partitions (ext4 12 GiB
    holding a 10 MiB file, FAT32 2 GiB, NTFS 5 GiB) in a recovery point; `files ls /` plus
    `files get` of the 10 MiB file, as two commands, and the share of the disk's chunks they
    fetched."""
    env = {"VMVAULT_PASSWORD": PASSWORD, "VMVAULT_STATE_DIR": str(work / "state")}
    folder = work / "files"
    folder.mkdir()
    disk = folder / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(20 << 30)
    subprocess.run(["sfdisk", "-q", disk], check=True, text=True,
                   input="label: gpt\nsize=12GiB, type=linux\nsize=2GiB, type=uefi\n"
                         "type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
    parts = json.loads(output(["sfdisk", "-J", disk]))["partitiontable"]["partitions"]
    src = folder / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "big.bin").write_bytes(os.urandom(10 << 20))
    (src / "etc").mkdir()
    (src / "etc" / "hostname").write_text("web01\n")
    p1, p2, p3 = parts
    run(["mkfs.ext4", "-q", "-F", "-d", src, "-E", f"offset={p1['start'] * 512}", disk,
         f"{p1['size'] // 2}k"])
    run(["mkfs.fat", "-F", "32", "--offset", str(p2["start"]), disk, str(p2["size"] // 2)])
    ntfs = folder / "p3.ntfs"
    with open(ntfs, "wb") as f:
        f.truncate(p3["size"] * 512)
    run(["mkntfs", "-F", "-Q", "-q", "-p", str(p3["start"]), ntfs])
    run(["dd", f"if={ntfs}", f"of={disk}", "bs=1M", f"seek={p3['start'] * 512}",
         "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"])
    os.unlink(ntfs)
    (folder / "vm.toml").write_text(VM_TOML)
    vault = folder / "vault"
    run([binary, "vault", "create", vault], env=env)
    run([binary, "backup", "--vault", vault, folder / "vm.toml"], env=env)
    settle()
    ls_s, _, ls_out = run([binary, "files", "ls", "--vault", vault, VM_NAME, "/", "--json",
                           "--verbose"], env=env)
    get_s, _, get_out = run([binary, "files", "get", "--vault", vault, VM_NAME,
                             "/p1/data/big.bin", "--to", folder / "out", "--json"], env=env)
    ls, get = json.loads(ls_out), json.loads(get_out)
    total = ls["chunks"]["total"]
    fetched = ls["chunks"]["fetched"] + get["chunks"]["fetched"]
    same = (folder / "out" / "big.bin").read_bytes() == (src / "data" / "big.bin").read_bytes()
    shutil.rmtree(folder)
    r = {"ls_seconds": round(ls_s, 3), "get_seconds": round(get_s, 3),
         "seconds": round(ls_s + get_s, 3), "chunks_total": total, "chunks_fetched": fetched,
         "identical": same}
    log(f"files: ls {ls_s:.2f} s + get {get_s:.2f} s, {fetched} of {total} chunks")
    return r


def files_markdown(r):
    return "\n".join([
        "### Single files from a 20 GiB disk", "",
        "A 20 GiB GPT disk (ext4 12 GiB with a 10 MiB file, FAT32 2 GiB, NTFS 5 GiB) in a "
        "recovery point; each command a process of its own, vault opening (Argon2id) included.", "",
        "| | |", "|---|---:|",
        f"| `files ls /` | {r['ls_seconds']:.2f} s |",
        f"| `files get /p1/data/big.bin` (10 MiB) | {r['get_seconds']:.2f} s |",
        f"| both | {r['seconds']:.2f} s |",
        f"| chunks fetched | {r['chunks_fetched']} of {r['chunks_total']} "
        f"({100 * r['chunks_fetched'] / r['chunks_total']:.2f}%) |",
        f"| extracted file identical | {r['identical']} |", ""])


def live_markdown(r):
    return "\n".join([
        "### Live restore", "",
        "`restore --live` of the full image into a paused QEMU 7.2 (TCG; its firmware reads the "
        "boot disk as soon as it runs), against a plain restore of the same point.", "",
        "| | seconds |", "|---|---:|",
        f"| command start → disk attached, VM running (every guest read served from here) | "
        f"{r['attached_seconds']:.2f} |",
        f"| command start → first read of the disk served | {r['first_read_seconds']:.2f} |",
        f"| command start → disk all local (overlay without backing) | {r['all_local_seconds']:.1f} |",
        f"| plain restore of the same disk | {r['plain_restore_seconds']:.1f} |", ""])


def storage_markdown(res):
    local = res["local"]
    lines = ["### Backup and restore by vault storage", "",
             "The full image backed up into, and restored from, a vault in a local directory and "
             "in object stores on 127.0.0.1 (Garage for S3, Azurite for Azure Blob), "
             "16 requests in flight; local ran first and last, the faster counts. CPU: seconds used "
             "by vmvault / by the storage server, which shares this machine's cores.", "",
             "| storage | backup MB/s (s) | vs local | CPU s | restore MB/s (s) | vs local | CPU s "
             "| identical |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for kind, r in res.items():
        lines.append(f"| {kind} | {r['backup_mbps']:,.0f} ({r['backup_seconds']:.1f} s) | "
                     f"{r['backup_mbps'] / local['backup_mbps']:.2f} | "
                     f"{r['backup_cpu_seconds']:.1f} / {r['backup_server_cpu_seconds']:.1f} | "
                     f"{r['restore_mbps']:,.0f} ({r['restore_seconds']:.1f} s) | "
                     f"{r['restore_mbps'] / local['restore_mbps']:.2f} | "
                     f"{r['restore_cpu_seconds']:.1f} / {r['restore_server_cpu_seconds']:.1f} | "
                     f"{r['identical']} |")
    served = [(kind, r) for kind, r in res.items() if "server_run" in r]
    if served:
        lines += ["", "The same full backup run by `vmvault server` (a job into a new vault in the "
                  "same storage, asked for and waited on with `vmvault backup NAME --wait`) against "
                  "the CLI's own backup in the same run:", "",
                  "| storage | CLI backup MB/s (s) | server-run MB/s (s) | server / CLI | "
                  "server CPU s |", "|---|---:|---:|---:|---:|"]
        for kind, r in served:
            s = r["server_run"]
            lines.append(f"| {kind} | {r['backup_mbps']:,.0f} ({r['backup_seconds']:.1f} s) | "
                         f"{s['backup_mbps']:,.0f} ({s['backup_seconds']:.1f} s) | "
                         f"{s['backup_mbps'] / r['backup_mbps']:.2f} | "
                         f"{s['backup_cpu_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def formats_markdown(res):
    raw = res["raw"]["mbps"]
    lines = ["### Backup by source image format", "",
             "Full backup by vmvault of the full image's content, as a raw file and converted by "
             "`qemu-img convert` to each format, each into a fresh vault from a warm source; raw ran "
             "first and last, the faster counts.", "",
             "| source format | MB/s (s) | vs raw |", "|---|---:|---:|"]
    for fmt, r in res.items():
        lines.append(f"| {fmt} | {r['mbps']:,.0f} ({r['seconds']:.1f} s) | {r['mbps'] / raw:.2f} |")
    return "\n".join(lines) + "\n"


def ensure_peers():
    if shutil.which("restic") and shutil.which("borg"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install = sudo + ["apt-get", "install", "-y", "restic", "borgbackup"]
    log("installing restic and borgbackup with apt-get")
    try:
        run(install, env=env)
    except BenchError:
        run(sudo + ["apt-get", "update"], env=env)
        run(install, env=env)


def target_dir():
    meta = json.loads(output(["cargo", "metadata", "--format-version", "1", "--no-deps",
                              "--manifest-path", REPO / "Cargo.toml"]))
    return Path(meta["target_directory"]) / "release"


def build(with_vmvault, with_servers=False):
    packages = ["-p", "vmvault", "-p", "vmvault-bench"] if with_vmvault else ["-p", "vmvault-bench"]
    if with_servers:
        packages += ["-p", "vmvault-testkit", "--bin", "vmvault-test-server", "--bin", "vmvault",
                     "--bin", "vmvault-primitives"]
    log(f"cargo build --release {' '.join(packages)}")
    try:
        run(["cargo", "build", "--release", *packages], cwd=REPO, capture=False)
    except BenchError as e:
        hint = "\n(if the vmvault CLI is not buildable yet, --skip-vmvault measures the rest)" \
            if with_vmvault else ""
        raise BenchError(f"{e}{hint}") from None
    return target_dir()


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "kernel": platform.release(), "load_average_at_start": os.getloadavg()[0]}


def per_core_costs(prims, comp):
    """Seconds per logical byte, on one core, of the work a backup cannot avoid.

    Every byte is read from the page cache; zero pieces are recognised and stored as nothing;
    every data piece is hashed (keyed BLAKE3) to name it; new data pieces are sealed (zstd -1 with
    the raw fallback, AES-256-GCM) by Sealer::seal. Writing the sealed chunks, indexing and
    everything else is left out, so a tool can only come close to the bound, never reach it.
    """
    data = comp["text"] + comp["other"]
    scan = 1 / prims["page_cache_read_mbps"] + comp["zero"] / prims["zero_mbps"] \
        + data / prims["blake3_mbps"]
    seal = comp["text"] / prims["seal_text_mbps"] + comp["other"] / prims["seal_random_mbps"]
    return scan / 1e6, seal / 1e6


def bounds(prims, comp_full, comp_incr, cores):
    """MB/s a perfect pipeline would reach on `cores` cores, from the per-core costs above."""
    scan_full, seal_full = per_core_costs(prims, comp_full)
    scan_incr, _ = per_core_costs(prims, comp_incr)
    return {
        "cores": cores,
        "full_per_core_mbps": round(1 / (scan_full + seal_full) / 1e6, 1),
        "full_mbps": round(cores / (scan_full + seal_full) / 1e6, 1),
        # An incremental still reads, zero-checks and hashes the whole image; sealing the few
        # changed chunks is left out, which makes this bound a little generous.
        "incremental_per_core_mbps": round(1 / scan_incr / 1e6, 1),
        "incremental_mbps": round(cores / scan_incr / 1e6, 1),
    }


def composition(report):
    return {"zero": report["file_zero_fraction"], "text": report["file_text_fraction"],
            "other": report["file_other_fraction"]}


# ---------------------------------------------------------------------------------------------
# Report


def fmt_mbps(step):
    return f"{step['mbps']:,.0f} ({step['seconds']:.1f} s)"


def fmt_mb(n):
    return f"{n / 1e6:,.0f}"


def fmt_ratio(a, b):
    if not b:
        return "–"
    return f"{a / b:.2f}"


def report_markdown(res):
    tools = res["tools"]
    names = list(tools)
    peers = [n for n in names if n != "vmvault"] if "vmvault" in tools else []
    header = ["", *names, *[f"vmvault/{p}" for p in peers]]
    rows = []

    def row(label, cell, ratio=None):
        r = [label, *[cell(tools[n]) for n in names]]
        for p in peers:
            r.append(fmt_ratio(ratio(tools["vmvault"]), ratio(tools[p])) if ratio else "")
        rows.append(r)

    for step, label in (("full", "full backup, MB/s (s)"),
                        ("incremental", "1% incremental, MB/s (s)"),
                        ("restore", "restore, MB/s (s)")):
        row(label, lambda t, s=step: fmt_mbps(t[s]), lambda t, s=step: t[s]["mbps"])
    row("stored after full backup, MB", lambda t: fmt_mb(t["full"]["stored_bytes"]),
        lambda t: t["full"]["stored_bytes"])
    row("added by incremental, MB", lambda t: fmt_mb(t["incremental"]["added_bytes"]),
        lambda t: t["incremental"]["added_bytes"])
    for step, label in (("full", "full backup, cores busy"),
                        ("incremental", "incremental, cores busy"),
                        ("restore", "restore, cores busy")):
        row(label, lambda t, s=step: f"{t[s]['cpu_seconds'] / t[s]['seconds']:.2f}")
    row("restore identical / sparse",
        lambda t: f"{'yes' if t['restore']['identical'] else '**NO**'} / "
                  f"{'yes' if t['restore']['sparse'] else 'no'}")

    img = res["image"]
    m = res["machine"]
    lines = [f"## {' vs '.join(names) or 'Machine limits'}: {img['bytes'] / 1e9:.2f} GB image "
             f"({img['size_arg']}), {m['cores']} cores", ""]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; "
                 f"load average {m['load_average_at_start']:.2f} at start.  ")
    lines.append(f"Image: `mkimage.py make --size {img['size_arg']} --seed 1`, "
                 f"{img['full']['zero'] * 100:.0f}% zero, {img['full']['text'] * 100:.0f}% "
                 f"text-like, {img['full']['other'] * 100:.0f}% random (by 1 MiB piece); "
                 f"incremental after `mutate --percent 1 --seed 2`.")
    lines.append("")
    if rows:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|" + "---:|" * (len(header) - 1))
        lines.extend("| " + " | ".join(r) + " |" for r in rows)
        lines.append("")
        legend = "MB/s = logical image size (10^6 bytes) / wall seconds. "
        if peers:
            legend += ("Ratios are vmvault divided by the peer: above 1 means vmvault is faster "
                       "(throughput rows) or stores more (stored rows). ")
        legend += ("Stored = `du -sb` of the repository. "
                   "Cores busy = user+sys CPU seconds / wall seconds.")
        lines.append(legend)
        lines.append("")
        lines.append("Page cache is not dropped (that cannot be done reliably here); instead "
                     "pending writes are synced and the input (the image, or the repository for "
                     "a restore) is read once before every timed step, so every tool starts "
                     "warm. Timings end when the tool exits; writes it has not synced itself "
                     "are not waited for.")
        lines.append("")
        lines.extend(f"- {t['version']}: {'; '.join(t['notes'])}" for t in tools.values())
        lines.append("")

    p = res["primitives"]
    lines.append("### This machine's limits (one thread each, 1 MiB pieces)")
    lines.append("")
    lines.append("| primitive | MB/s per core |")
    lines.append("|---|---:|")
    prim_rows = [
        ("page-cache read of the image (1 MiB `read`s)", "page_cache_read_mbps"),
        ("BLAKE3, keyed", "blake3_mbps"),
        (f"zstd level 1, text-like data (→ {p['zstd_text_ratio']:.2f} of input)",
         "zstd_text_mbps"),
        ("zstd level 1, random data", "zstd_random_mbps"),
        ("AES-256-GCM seal (ring)", "aes_gcm_mbps"),
        ("zero detection (`is_zero`) on zeros", "zero_mbps"),
        ("vmvault `Sealer::seal` (zstd + AES-GCM), text-like", "seal_text_mbps"),
        ("vmvault `Sealer::seal`, random (compression probe, kept raw)", "seal_random_mbps"),
    ]
    lines.extend(f"| {label} | {p[key]:,.0f} |" for label, key in prim_rows)
    lines.append("")

    b = res["bounds"]
    c = img["full"]
    lines.append(
        "**Bound.** Per core, a full backup of this image must at least read every byte from "
        "the page cache, recognise the zero pieces, hash (keyed BLAKE3) the data pieces and seal "
        "them, so one core needs 1/read + z/zero + (t+r)/BLAKE3 + t/seal_text + r/seal_random "
        f"seconds per byte with z, t, r = {c['zero']:.2f}, {c['text']:.2f}, {c['other']:.2f} "
        f"the zero, text-like and random shares: {b['full_per_core_mbps']:,.0f} MB/s per core, "
        f"× {b['cores']} cores = **{b['full_mbps']:,.0f} MB/s**, assuming perfect parallelism "
        "and nothing else to do (no writes, no index). The incremental bound drops the sealing "
        "term (only the changed chunks are sealed) and uses the mutated image's shares: "
        f"{b['incremental_per_core_mbps']:,.0f} MB/s per core, × {b['cores']} = "
        f"**{b['incremental_mbps']:,.0f} MB/s**.")
    lines.append("")
    for name, t in tools.items():
        lines.append(f"- {name}: full backup {t['full']['mbps']:,.0f} MB/s = "
                     f"{t['full']['mbps'] / b['full_mbps'] * 100:.0f}% of the bound; "
                     f"incremental {t['incremental']['mbps']:,.0f} MB/s = "
                     f"{t['incremental']['mbps'] / b['incremental_mbps'] * 100:.0f}% of the bound.")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="image size (default 4G)")
    ap.add_argument("--workdir", type=Path,
                    help="where to make a scratch directory (default: the system temp dir)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write all results as JSON")
    ap.add_argument("--skip-peers", action="store_true",
                    help="measure only vmvault and the primitives")
    ap.add_argument("--skip-vmvault", action="store_true",
                    help="measure only the peers and the primitives")
    ap.add_argument("--vmvault-bin", type=Path,
                    help="use this vmvault binary instead of building one")
    ap.add_argument("--chunk-size", metavar="SIZE",
                    help="create vmvault's vault with this chunk size (e.g. 256K, 4M)")
    ap.add_argument("--formats", metavar="LIST",
                    help="also back up the image converted to these formats (e.g. qcow2,vhdx) "
                         "and compare with raw")
    ap.add_argument("--storage", metavar="LIST",
                    help="also back up and restore into these object stores (garage, azurite, "
                         "moto) and compare with a local-directory vault")
    ap.add_argument("--live", action="store_true",
                    help="also measure restore --live into a QEMU VM (installs QEMU with "
                         "scripts/install-qemu)")
    ap.add_argument("--running", action="store_true",
                    help="also measure full and incremental backups of a running QEMU VM "
                         "(installs QEMU with scripts/install-qemu)")
    ap.add_argument("--quiesce", action="store_true",
                    help="also measure how long a backup keeps a real Linux guest frozen "
                         "(builds the test guest with scripts/make-qga-guest)")
    ap.add_argument("--files", action="store_true",
                    help="also measure single-file restore from a 20 GiB three-partition disk "
                         "(needs sfdisk, mkfs.ext4, mkfs.fat, mkntfs)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the scratch directory (images, repositories, restores)")
    args = ap.parse_args()
    if args.skip_peers and args.skip_vmvault:
        ap.error("--skip-peers and --skip-vmvault leave nothing to compare")
    if not MKIMAGE.is_file():
        ap.error(f"{MKIMAGE} not found")
    size_bytes = parse_size(args.size)
    if size_bytes < MIB:
        ap.error("--size must be at least 1M")

    result = {"machine": machine()}
    if result["machine"]["load_average_at_start"] > 0.5:
        log(f"note: load average {result['machine']['load_average_at_start']:.2f}: other work "
            "on this machine will slow every figure down")

    if not args.skip_peers:
        ensure_peers()
    release = build(with_vmvault=not args.skip_vmvault and args.vmvault_bin is None,
                    with_servers=bool(args.storage))
    primitives_bin = release / "vmvault-primitives"
    vmvault_bin = None
    if not args.skip_vmvault:
        vmvault_bin = args.vmvault_bin.resolve() if args.vmvault_bin else release / "vmvault"
        if not vmvault_bin.is_file():
            raise BenchError(f"{vmvault_bin} does not exist")

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vmvault-bench-", dir=args.workdir)).resolve()
    log(f"scratch directory {work}")
    try:
        images = {"full": work / "full" / "disk.raw", "incremental": work / "incremental" / "disk.raw"}
        for image in images.values():
            image.parent.mkdir()
            (image.parent / "vm.toml").write_text(VM_TOML)
        log(f"making a {args.size} image")
        run([sys.executable, MKIMAGE, "make", images["full"], "--size", args.size, "--seed", "1"])
        sparse_copy(images["full"], images["incremental"])
        run([sys.executable, MKIMAGE, "mutate", images["incremental"], "--percent", "1",
             "--seed", "2"])
        size = os.path.getsize(images["full"])

        log("measuring primitives")
        settle()
        prims = json.loads(output([primitives_bin, "--file", images["full"]]))
        mutated = json.loads(output([primitives_bin, "--file", images["incremental"],
                                     "--file-only"]))
        result["image"] = {"bytes": size, "size_arg": args.size,
                           "full": composition(prims), "incremental": composition(mutated)}
        result["primitives"] = prims
        result["bounds"] = bounds(prims, composition(prims), composition(mutated),
                                  os.cpu_count() or 1)

        tools = []
        if vmvault_bin:
            tools.append(Vmvault(work, images, vmvault_bin, args.chunk_size))
        if not args.skip_peers:
            tools += [Restic(work, images), Borg(work, images)]
        result["tools"] = {}
        for tool in tools:
            result["tools"][tool.name] = measure(tool, size, args.keep)

        if args.formats and vmvault_bin:
            result["formats"] = measure_formats(vmvault_bin, images["full"],
                                                args.formats.split(","), work, args.keep)
        if args.storage and vmvault_bin:
            result["storage"] = measure_storage(vmvault_bin, release / "vmvault-test-server",
                                                images["full"], args.storage.split(","), work,
                                                args.keep)
        if args.files and vmvault_bin:
            result["files"] = measure_files(vmvault_bin, work)
        if args.live and vmvault_bin:
            result["live"] = measure_live(vmvault_bin, images["full"], work)
        if args.quiesce and vmvault_bin:
            result["quiesce"] = measure_quiesce(vmvault_bin, work)
        if args.running and vmvault_bin:
            result["running"] = measure_running(vmvault_bin, images["full"], work,
                                                args.chunk_size)
        print(report_markdown(result))
        if "live" in result:
            print(live_markdown(result["live"]))
        if "running" in result:
            print(running_markdown(result["running"]))
        if "quiesce" in result:
            print(quiesce_markdown(result["quiesce"]))
        if "files" in result:
            print(files_markdown(result["files"]))
        if "formats" in result:
            print(formats_markdown(result["formats"]))
        if "storage" in result:
            print(storage_markdown(result["storage"]))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            log(f"wrote {args.json}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench/run.py: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
