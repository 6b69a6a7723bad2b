"""C-STORE ingest benchmark: vnpacs (filesystem and S3 back ends) against Orthanc and DCMTK.

Pushes a cached synthetic CT set with DCMTK storescu over 1 and 4 parallel
associations to each target, verifies every instance arrived (a run that lost
data is reported as failed, not timed) and writes bench/results/ingest.md.
Optionally pushes one ~1 GB multi-frame instance to measure the server's peak RSS.

    python -m bench.ingest                       # full run (10 × 2 × 100 slices, 3 rounds)
    python -m bench.ingest --studies 1 --slices 20 --targets orthanc,storescp --skip-large
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pydicom
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pacs.synthetic import generate_ct_studies, make_multiframe
from storage.blobstore import S3BlobStore
from tests.services import (
    MAX_PDU,
    Service,
    ServiceError,
    create_pg_database,
    ensure_postgres_running,
    start_orthanc,
    start_storescp_ignore,
    start_vnpacs,
    start_weed,
    wait_until,
)

BENCH_DIR = Path(__file__).resolve().parent
STORESCU = "/usr/bin/storescu"  # DCMTK, not pynetdicom's storescu in the venv
TARGETS = ("storescp", "s3-put", "orthanc", "vnpacs-fs", "vnpacs-s3")
# Not run by default: the two mixed configurations, which tell how much of the S3+PostgreSQL time is whose.
EXTRA_TARGETS = ("vnpacs-fs-pg", "vnpacs-s3-sqlite")
TARGET_LABELS = {
    "storescp": "storescp --ignore",
    "s3-put": "S3 PUT alone (weed)",
    "orthanc": "Orthanc",
    "vnpacs-fs": "vnpacs fs+SQLite",
    "vnpacs-s3": "vnpacs S3+PostgreSQL",
    "vnpacs-fs-pg": "vnpacs fs+PostgreSQL",
    "vnpacs-s3-sqlite": "vnpacs S3+SQLite",
}
_VNPACS_CONFIGS = {  # target → (S3 blobs, PostgreSQL index)
    "vnpacs-fs": (False, False),
    "vnpacs-s3": (True, True),
    "vnpacs-fs-pg": (False, True),
    "vnpacs-s3-sqlite": (True, False),
}
S3_BUCKET = "vnpacs-bench"
LARGE_MODE = "multi-frame"


@dataclass(frozen=True)
class SeriesRef:
    study_uid: str
    series_uid: str
    sop_uids: frozenset[str]


@dataclass(frozen=True)
class BenchSet:
    """The files to push and what a target must hold afterwards."""

    files: list[Path]
    series: list[SeriesRef]
    total_bytes: int
    description: str

    @property
    def count(self) -> int:
        return len(self.files)


@dataclass
class Result:
    target: str
    mode: str
    instances: int
    nbytes: int
    seconds: float | None = None
    peak_rss: int | None = None
    error: str | None = None
    ratio_orthanc: float | None = None
    ratio_storescp: float | None = None
    spread: tuple[float, float] | None = None  # slowest and fastest run's seconds, when there were several
    cpu_seconds: float | None = None  # user + system CPU of the server's processes during the push

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds is not None

    @property
    def inst_per_s(self) -> float | None:
        return self.instances / self.seconds if self.ok and self.seconds else None

    @property
    def mb_per_s(self) -> float | None:
        return self.nbytes / 1e6 / self.seconds if self.ok and self.seconds else None


@dataclass
class Target:
    """A started service plus how to reach and audit it."""

    service: Service
    port: int
    aet: str
    count: Callable[[BenchSet], int] | None  # instances of the set now stored; None = cannot tell
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    rss: bool = True
    # Sends the files itself instead of storescu: (files, parallel senders) -> (wall seconds, error or None).
    send: Callable[[Sequence[Path], int], tuple[float, str | None]] | None = None


# --------------------------------------------------------------------------- data set


def _series_refs(files: Sequence[Path]) -> list[SeriesRef]:
    groups: dict[tuple[str, str], set[str]] = {}
    for f in files:
        ds = pydicom.dcmread(
            f,
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
        groups.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), set()).add(str(ds.SOPInstanceUID))
    return [SeriesRef(st, se, frozenset(sops)) for (st, se), sops in groups.items()]


def prepare_ct_set(
    cache: Path, *, studies: int, series: int, slices: int, rows: int, cols: int, seed: int, console: Console
) -> BenchSet:
    """Generate the CT set once into `cache`; reruns with the same shape reuse it."""
    name = f"ct-{studies}x{series}x{slices}-{rows}x{cols}-seed{seed}"
    root = cache / name
    manifest = root / "manifest.json"
    if not manifest.exists():
        shutil.rmtree(root, ignore_errors=True)
        total = studies * series * slices
        with Progress(
            TextColumn("generating {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task(name, total=total)
            t0 = time.perf_counter()
            files = generate_ct_studies(
                root / "files",
                studies=studies,
                series_per_study=series,
                slices=slices,
                rows=rows,
                cols=cols,
                seed=seed,
                progress=lambda n: progress.update(task, completed=n),
            )
        console.print(f"generated {total} slices in {time.perf_counter() - t0:.1f}s -> {root}")
        refs = _series_refs(files)
        manifest.write_text(
            json.dumps(
                {
                    "files": [str(f.relative_to(root)) for f in files],
                    "series": [
                        {"study": r.study_uid, "series": r.series_uid, "sops": sorted(r.sop_uids)} for r in refs
                    ],
                }
            )
        )
    data = json.loads(manifest.read_text())
    files = [root / f for f in data["files"]]
    refs = [SeriesRef(s["study"], s["series"], frozenset(s["sops"])) for s in data["series"]]
    nbytes = sum(f.stat().st_size for f in files)
    desc = f"{studies} studies × {series} series × {slices} CT slices {rows}×{cols} int16"
    desc += f" ({len(files)} files, {nbytes / 1e6:.0f} MB)"
    return BenchSet(files, refs, nbytes, desc)


def prepare_large(cache: Path, megabytes: int, console: Console) -> BenchSet:
    """One multi-frame instance of about `megabytes` MB, streamed to disk and cached."""
    path = cache / f"multiframe-{megabytes}MB.dcm"
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_suffix(".part")
        make_multiframe(tmp, target_bytes=megabytes * 1_000_000)
        tmp.rename(path)
        console.print(f"generated {path.name} in {time.perf_counter() - t0:.1f}s")
    nbytes = path.stat().st_size
    return BenchSet([path], _series_refs([path]), nbytes, f"1 multi-frame instance ({nbytes / 1e6:.0f} MB)")


def warm_page_cache(files: Sequence[Path]) -> None:
    """Read every file once so the first target timed does not pay for cold disk reads."""
    for f in files:
        with f.open("rb") as fh:
            while fh.read(1 << 20):
                pass


# --------------------------------------------------------------------------- pushing and auditing


def split_files(files: Sequence[Path], senders: int) -> list[Sequence[Path]]:
    """`files` in at most `senders` equal contiguous groups, one per parallel sender."""
    size = -(-len(files) // senders)
    return [files[i : i + size] for i in range(0, len(files), size)]


def push(
    files: Sequence[Path], *, port: int, aet: str, calling_aet: str, assocs: int, timeout: float
) -> tuple[float, str | None]:
    """Send `files` with `assocs` concurrent storescu processes; (wall seconds, error or None).

    Each process reads its file names from a DCMTK command file (`@file`): tens of thousands of paths on the
    command line would exceed the kernel's argument size limit (E2BIG).
    """
    if any('"' in str(f) for f in files):
        raise ValueError('storescu command files cannot quote a path containing "')
    groups = split_files(files, assocs)
    env = dict(os.environ, TCP_NODELAY="1")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    lists: list[Path] = []
    t0 = time.perf_counter()
    try:
        for group in groups:
            fd, list_name = tempfile.mkstemp(prefix="storescu-", suffix=".args")
            lists.append(Path(list_name))
            with os.fdopen(fd, "w") as fh:
                fh.writelines(f'"{f}"\n' for f in group)
        t0 = time.perf_counter()  # writing the lists is not part of the push
        for file_list in lists:
            fd, log_name = tempfile.mkstemp(prefix="storescu-", suffix=".log")
            logs.append(Path(log_name))
            cmd = [
                STORESCU,
                "-aet",
                calling_aet,
                "-aec",
                aet,
                "-R",
                "-pdu",
                str(MAX_PDU),
                "127.0.0.1",
                str(port),
                f"@{file_list}",
            ]
            procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd))
            os.close(fd)
        deadline = t0 + timeout
        for p in procs:
            p.wait(max(1.0, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - t0
        errors = []
        for p, log in zip(procs, logs, strict=True):
            text = log.read_text(errors="replace")
            bad = [line for line in text.splitlines() if line.startswith(("E:", "F:"))]
            if p.returncode != 0 or bad:
                errors.append(f"storescu rc={p.returncode} " + " | ".join(bad[:3]))
        return elapsed, "; ".join(errors) or None
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, f"storescu timed out after {timeout:.0f}s"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs + lists:
            log.unlink(missing_ok=True)


def put_files(store: S3BlobStore, files: Sequence[Path], senders: int) -> tuple[float, str | None]:
    """Upload `files` to the S3 store as vnpacs does (its S3BlobStore.put_file), from `senders` threads each taking
    an equal contiguous group, as the storescu processes do: what the S3 server alone allows, with no DICOM."""
    groups = split_files(files, senders)
    errors: list[str] = []

    def send(offset: int, group: Sequence[Path]) -> None:
        try:
            for i, path in enumerate(group, offset):
                store.put_file(f"bench/{i:06d}.dcm", path, path.stat().st_size)
        except Exception as exc:  # reported as the run's error, as a failed storescu is
            errors.append(f"{type(exc).__name__}: {exc}")

    starts = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
    threads = [threading.Thread(target=send, args=(start, g)) for start, g in zip(starts, groups, strict=True)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0, errors[0] if errors else None


@contextlib.contextmanager
def _find_association(port: int, aet: str, calling_aet: str) -> Iterator[Any]:
    """A Study Root C-FIND association to the server, released on exit."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise ServiceError("C-FIND association rejected")
    try:
        yield assoc
    finally:
        assoc.release()


def cfind_count(port: int, aet: str, calling_aet: str, bench: BenchSet) -> int:
    """Instances of `bench` the server reports, via IMAGE-level C-FIND per known series."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore

    found = 0
    with _find_association(port, aet, calling_aet) as assoc:
        for ref in bench.series:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = ref.study_uid
            query.SeriesInstanceUID = ref.series_uid
            query.SOPInstanceUID = ""
            sops: set[str] = set()
            for status, ident in assoc.send_c_find(query, FIND):
                if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
                    sops.add(str(ident.get("SOPInstanceUID", "")))
            found += len(sops & ref.sop_uids)
    return found


def cfind_study_instances(port: int, aet: str, calling_aet: str, bench: BenchSet, chunk: int = 500) -> int:
    """Instances of `bench` the server reports, via STUDY-level C-FIND of NumberOfStudyRelatedInstances.

    One query per `chunk` studies (UID list matching), so auditing 100,000 instances takes a few requests instead
    of one IMAGE-level C-FIND per series. Each study counts at most the instances `bench` holds for it, so only a
    study that has all of its instances adds up to the total; this relies on the server starting empty (a count
    cannot tell one SOP Instance UID from another).
    """
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore

    expected: dict[str, int] = {}
    for ref in bench.series:
        expected[ref.study_uid] = expected.get(ref.study_uid, 0) + len(ref.sop_uids)
    uids = sorted(expected)
    found: dict[str, int] = {}
    with _find_association(port, aet, calling_aet) as assoc:
        for i in range(0, len(uids), chunk):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = "\\".join(uids[i : i + chunk])
            query.NumberOfStudyRelatedInstances = ""
            for status, ident in assoc.send_c_find(query, FIND):
                code = status.Status if status else None
                if code in (0xFF00, 0xFF01) and ident is not None:
                    found[str(ident.StudyInstanceUID)] = int(ident.get("NumberOfStudyRelatedInstances") or 0)
                elif code != 0x0000:
                    raise ServiceError(f"C-FIND failed: status {code if code is None else f'0x{code:04X}'}")
    return sum(min(found.get(uid, 0), n) for uid, n in expected.items())


def verify(target: Target, bench: BenchSet, timeout: float) -> str | None:
    """None when the target holds every instance (polls briefly for asynchronous indexing)."""
    counter = target.count
    if counter is None:
        return None
    last = -1
    error: Exception | None = None

    def complete() -> bool:
        nonlocal last, error
        try:
            last = counter(bench)
        except Exception as exc:
            error = exc
            raise
        error = None
        return last >= bench.count

    try:
        wait_until(complete, timeout=timeout, what="verification", interval=0.2)
    except ServiceError:
        if error is not None:
            return f"audit failed: {type(error).__name__}: {error}"
        return f"lost data: {last}/{bench.count} instances found"
    return None


# --------------------------------------------------------------------------- targets


@contextlib.contextmanager
def start_target(name: str, workdir: Path, args: argparse.Namespace) -> Iterator[Target]:
    """Start a fresh instance of `name` with empty storage; always stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    with stack:
        if name == "storescp":
            scp = stack.enter_context(start_storescp_ignore(log_path=workdir / "storescp.log"))
            yield Target(scp, scp.port, scp.ae_title, None, rss=False)
        elif name == "s3-put":
            s3 = stack.enter_context(start_weed(workdir / "weed"))
            s3.make_bucket(S3_BUCKET)
            store = S3BlobStore(s3.url(S3_BUCKET), s3.access_key, s3.secret_key, tmp_dir=workdir / "tmp")
            yield Target(
                s3, 0, "", lambda b: sum(1 for _ in store.iter_keys()), send=lambda f, n: put_files(store, f, n)
            )
        elif name == "orthanc":
            orthanc = stack.enter_context(start_orthanc(workdir))
            yield Target(orthanc, orthanc.dicom_port, orthanc.aet, lambda b: orthanc.count_instances())
        elif name in _VNPACS_CONFIGS:
            # The product default (a DIMSE process per core), not the single process the tests start with.
            env = {"VNPACS_DIMSE_PROCESSES": "0", **dict(kv.split("=", 1) for kv in args.vnpacs_env)}
            on_s3, on_pg = _VNPACS_CONFIGS[name]
            if on_s3:
                s3 = stack.enter_context(start_weed(workdir / "weed"))
                s3.make_bucket(S3_BUCKET)
                env.update(
                    VNPACS_STORAGE_URL=s3.url(S3_BUCKET),
                    VNPACS_S3_ACCESS_KEY=s3.access_key,
                    VNPACS_S3_SECRET_KEY=s3.secret_key,
                )
            if on_pg:
                ensure_postgres_running()
                db = stack.enter_context(create_pg_database("vnpacs_bench"))
                env.update(VNPACS_DATABASE_URL=db.url)
            srv = stack.enter_context(start_vnpacs(env, workdir / "vnpacs"))
            yield Target(
                srv,
                srv.dicom_port,
                srv.ae_title,
                lambda b: cfind_count(srv.dicom_port, srv.ae_title, args.calling_aet, b),
            )
        else:
            raise ValueError(f"unknown target {name}")


# ext4's recently_deleted(): an inode freed less than a minute ago is not reused (no-journal mode).
INODE_RECENCY_S = 61


def run_one(
    name: str,
    mode: str,
    assocs: int,
    bench: BenchSet,
    workdir: Path,
    args: argparse.Namespace,
    console: Console,
) -> Result:
    result = Result(TARGET_LABELS[name], mode, bench.count, bench.total_bytes)
    try:
        with start_target(name, workdir, args) as target:
            # Every target starts on a quiet disk: without this, the previous run's unflushed writes (a server
            # that does not fsync leaves up to a GB dirty) are written back during the next target's run.
            os.sync()
            pid = target.service.proc.pid if target.rss and target.service.proc is not None else None
            cpu_before = process_tree_cpu(pid) if pid is not None else 0.0
            if target.send is not None:
                seconds, error = target.send(bench.files, assocs)
            else:
                seconds, error = push(
                    bench.files,
                    port=target.port,
                    aet=target.aet,
                    calling_aet=args.calling_aet,
                    assocs=assocs,
                    timeout=args.push_timeout,
                )
            if pid is not None:
                result.cpu_seconds = process_tree_cpu(pid) - cpu_before
            error = error or verify(target, bench, args.verify_timeout)
            if target.rss:
                with contextlib.suppress(Exception):
                    result.peak_rss = target.service.peak_rss_bytes()
            if error:
                result.error = error
                console.print(f"[red]{result.target} {mode}: {error}[/red]")
                console.print(target.service.log_tail(15), markup=False, highlight=False)
            else:
                result.seconds = seconds
    except Exception as exc:  # one broken target must not hide the others' numbers
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        console.print(f"[red]{result.target} {mode} failed:[/red]")
        console.print(str(exc)[-2000:], markup=False, highlight=False)
    # The run's data stays: `main` deletes a round's at its end (see INODE_RECENCY_S).
    if result.ok:
        console.print(
            f"{result.target:22} {mode:10} {result.seconds:7.2f}s {result.inst_per_s:8.1f} inst/s "
            f"{result.mb_per_s:7.1f} MB/s"
        )
    return result


def median_result(runs: list[Result]) -> Result:
    """One row from a target's runs in one mode: the median run (the slower middle one of an even count), its
    peak RSS the highest seen; any failed run fails the row, since a run that lost data is never averaged away."""
    failed = next((r for r in runs if not r.ok), None)
    if failed is not None:
        return failed
    ordered = sorted(runs, key=lambda r: cast(float, r.seconds))
    row = dataclasses.replace(ordered[len(ordered) // 2])
    row.peak_rss = max((r.peak_rss for r in runs if r.peak_rss), default=None)
    if len(runs) > 1:
        row.spread = (cast(float, ordered[-1].seconds), cast(float, ordered[0].seconds))
    return row


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process and of its live descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


def add_ratios(results: list[Result]) -> None:
    """Throughput relative to Orthanc and to the storescp limit in the same mode."""
    by_key = {(r.target, r.mode): r for r in results}
    for r in results:
        for ref_name, attr in (("orthanc", "ratio_orthanc"), ("storescp", "ratio_storescp")):
            ref = by_key.get((TARGET_LABELS[ref_name], r.mode))
            if r.ok and ref is not None and ref.ok and ref.mb_per_s and r.mb_per_s:
                setattr(r, attr, r.mb_per_s / ref.mb_per_s)


# --------------------------------------------------------------------------- reporting

COLUMNS = (
    "Target",
    "Mode",
    "Instances",
    "Seconds",
    "Inst/s",
    "MB/s",
    "vs Orthanc",
    "vs storescp",
    "Peak RSS MB",
    "CPU ms/inst",
    "Range",
    "Status",
)


def _row(r: Result) -> list[str]:
    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    per_instance = r.mode != LARGE_MODE  # instances/s of a single instance says nothing
    spread = "–"
    if r.spread is not None:  # the range of the runs, in the unit the row is read in
        slow, fast = (r.instances / t if per_instance else r.nbytes / 1e6 / t for t in r.spread)
        spread = f"{slow:.0f}–{fast:.0f}"
    return [
        r.target,
        r.mode,
        str(r.instances),
        num(r.seconds, ".2f"),
        num(r.inst_per_s if per_instance else None, ".1f"),
        num(r.mb_per_s, ".1f"),
        num(r.ratio_orthanc, ".2f"),
        num(r.ratio_storescp, ".2f"),
        num(r.peak_rss / 1e6 if r.peak_rss else None, ".0f"),
        num(1000 * r.cpu_seconds / r.instances if r.cpu_seconds is not None and per_instance else None, ".2f"),
        spread,
        "ok" if r.ok else f"FAILED: {r.error}",
    ]


def rich_table(results: list[Result], title: str) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("Target", "Mode", "Status") else "right")
    for r in results:
        table.add_row(*_row(r), style=None if r.ok else "red")
    return table


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def markdown(results: list[Result], sets: list[BenchSet], args: argparse.Namespace) -> str:
    lines = [
        "# Ingest benchmark",
        "",
        f"Generated by `python -m bench.ingest` on {datetime.now(UTC):%Y-%m-%d}.",
        "",
        f"- Host: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, Python {platform.python_version()}",
        f"- Client: DCMTK `{_tool_version([STORESCU, '--version'])}`, max PDU {MAX_PDU}, TCP_NODELAY=1, "
        f"1 or 4 concurrent storescu processes (files split into equal contiguous groups)",
        f"- Orthanc: `{_tool_version(['/usr/sbin/Orthanc', '--version'])}` (SQLite index, no compression)",
        *(f"- Data: {s.description}" for s in sets),
        "- MB = 10^6 bytes of Part 10 files sent; time is wall clock from launching storescu",
        "  to the last one exiting.",
        "- Every target is started fresh per run, on a quiet disk (sync before the push), and audited afterwards",
        "  (vnpacs: IMAGE-level C-FIND of every series; Orthanc: /statistics CountInstances); a run that lost data",
        "  is FAILED and not timed.",
        f"- {args.rounds} round(s): each round runs every target in every mode once, so the host's changes of speed",
        "  fall on all targets alike. A row is the median run; Range is the slowest and fastest run (inst/s, or MB/s",
        "  for the multi-frame); ratios are between medians.",
        "- S3 PUT alone: the same files uploaded to a fresh SeaweedFS (`weed mini`, as the S3 configuration uses) by",
        "  vnpacs's own S3 client code from 1 or 4 threads, without DICOM: the S3 server's limit, as storescp's is the",
        "  network's. Its CPU ms/inst and peak RSS are the S3 server's. Audited by listing the bucket.",
        "- vnpacs runs its default of one DIMSE process per core (VNPACS_DIMSE_PROCESSES=0; here 2).",
        "- Runs' data: "
        + (
            f"deleted at the end of each round, and the next round started {INODE_RECENCY_S} s later, so that no run"
            " creates its files among inodes just deleted (ext4 without a journal skips those, one by one, for a"
            " minute)."
            if not args.keep
            else "kept (--keep)."
        ),
        "- Peak RSS is VmHWM of the server process; storescp forks per association, so it is not measured.",
        "- CPU ms/inst: user + system CPU of the server's processes (vnpacs: with its DIMSE workers) during the",
        "  push, from /proc, per instance; the clients' and the kernel's other work is not in it.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in ("Target", "Mode", "Status") else "---:" for c in COLUMNS) + "|",
    ]
    for r in results:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _row(r)) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def bench_console(width: int) -> Console:
    """A console for the tables; in logs and CI, wide enough not to squeeze them into 80 columns."""
    console = Console()
    return console if console.is_terminal else Console(width=width)


def have_storescu(console: Console) -> bool:
    if Path(STORESCU).exists():
        return True
    console.print(f"[red]{STORESCU} missing (apt-get install dcmtk)[/red]")
    return False


def prepare_dataset(args: argparse.Namespace, console: Console) -> BenchSet:
    """The CT set `add_dataset_args` describes, generated once into the cache folder."""
    return prepare_ct_set(
        args.cache_dir,
        studies=args.studies,
        series=args.series,
        slices=args.slices,
        rows=args.rows,
        cols=args.cols,
        seed=args.seed,
        console=console,
    )


def add_dataset_args(
    p: argparse.ArgumentParser, *, slices: int, studies: int = 10, rows: int = 512, cols: int = 512
) -> None:
    """The synthetic data set's shape, shared by the benchmarks."""
    p.add_argument("--studies", type=int, default=studies)
    p.add_argument("--series", type=int, default=2, help="series per study")
    p.add_argument("--slices", type=int, default=slices, help="slices per series")
    p.add_argument("--rows", type=int, default=rows)
    p.add_argument("--cols", type=int, default=cols)
    p.add_argument("--seed", type=int, default=0)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataset_args(p, slices=100)
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list from {','.join(TARGETS + EXTRA_TARGETS)}")
    p.add_argument("--assocs", default="1,4", help="comma list of parallel association counts")
    p.add_argument("--rounds", type=positive_int, default=3, help="runs of every target and mode (median reported)")
    p.add_argument("--skip-large", action="store_true", help="skip the ~1 GB multi-frame peak-RSS run")
    p.add_argument("--large-mb", type=int, default=1000, help="size of the multi-frame instance in MB")
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    p.add_argument("--workdir", type=Path, default=None, help="where servers keep data (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep server data and logs after each run")
    p.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "ingest.md")
    p.add_argument("--calling-aet", default="STORESCU", help="AE title used by storescu and the C-FIND audit")
    p.add_argument(
        "--vnpacs-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for vnpacs, e.g. VNPACS_ALLOWED_AES=...",
    )
    p.add_argument("--push-timeout", type=float, default=1800.0)
    p.add_argument("--verify-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_list) - set(TARGETS + EXTRA_TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.assoc_list = [int(a) for a in args.assocs.split(",") if a.strip()]
    if any("=" not in kv for kv in args.vnpacs_env):
        p.error("--vnpacs-env takes KEY=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = bench_console(170)
    if not have_storescu(console):
        return 2
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    ct = prepare_dataset(args, console)
    sets = [ct]
    large = None if args.skip_large else prepare_large(args.cache_dir, args.large_mb, console)
    if large is not None:
        sets.append(large)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="vnpacs-bench-")) if own_workdir else args.workdir
    # ext4 without a journal (this VM's root) skips, for every new inode, the inodes deleted in the last minute,
    # one by one: deleting each run's thousands of files right away made every next run's file creations scan them
    # (perf: about a tenth of vnpacs' CPU per object, in ext4_create and mkdir). A round's data is deleted when the
    # round ends, and the next round starts a minute later.
    leftovers: list[Path] = []  # this round's runs' data

    def remove_leftovers() -> None:
        if not args.keep:
            for leftover in leftovers:
                shutil.rmtree(leftover, ignore_errors=True)
        leftovers.clear()

    runs: dict[tuple[str, str], list[Result]] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            if leftovers and not args.keep:
                remove_leftovers()
                os.sync()
                console.print(f"waiting {INODE_RECENCY_S} s for the deleted inodes to age (ext4 without a journal)")
                time.sleep(INODE_RECENCY_S)
            console.print(f"[bold]round {round_no} of {args.rounds}[/bold]")
            warm_page_cache(ct.files)
            for name in args.target_list:
                for assocs in args.assoc_list:
                    mode = f"{assocs} assoc"
                    where = workdir / f"{name}-{assocs}-{round_no}"
                    leftovers.append(where)
                    runs.setdefault((name, mode), []).append(run_one(name, mode, assocs, ct, where, args, console))
            if large is not None:
                warm_page_cache(large.files)
                for name in args.target_list:
                    where = workdir / f"{name}-large-{round_no}"
                    leftovers.append(where)
                    runs.setdefault((name, LARGE_MODE), []).append(
                        run_one(name, LARGE_MODE, 1, large, where, args, console)
                    )
    finally:
        remove_leftovers()
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results = [median_result(r) for r in runs.values()]
    add_ratios(results)
    console.print(rich_table(results, f"Ingest: {ct.description}"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown(results, sets, args))
    console.print(f"wrote {args.output}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
