"""A full disk is reported as what it is, loses nothing, and stops mattering once space is freed.

The disk is real: a small tmpfs mounted for the test and filled with a ballast file; on
PostgreSQL it holds a tablespace the test's schema is created in. Mounting needs root on
Linux: outside CI a machine that cannot mount skips these tests, in CI they fail.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

import tether
from tests.clikit import cli_invoker, error_line, ok
from tests.conftest import IN_CI, POSTGRES_URL, _postgres_admin
from tether.testing import active_agent, background_worker

FILL_BLOB = 1024
"""Characters of the state written until the disk is full: small, so it fills the last gap."""
BIG_BLOB = 10_000
"""Characters of the writes that must then fail: larger than any gap a failed write leaves
(and the longest reason tether takes)."""


@contextmanager
def small_disk(owner: str | None = None) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted on a new folder (owned by ``owner``), unmounted afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="tether-disk-"))
    folder.chmod(0o755)  # PostgreSQL's server must reach its tablespace in there
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(folder)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        problem = done.stderr.strip() if done.returncode else ""
    except OSError as exc:  # no mount command here
        problem = str(exc)
    if problem:
        folder.rmdir()
        message = f"cannot mount a small tmpfs to fill up ({problem}); these tests need root"
        if IN_CI:
            pytest.fail(f"{message} (CI must run them)")
        pytest.skip(message)
    try:
        if owner is not None:
            user = pwd.getpwnam(owner)
            os.chown(folder, user.pw_uid, user.pw_gid)
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False, timeout=30)
        folder.rmdir()


@contextmanager
def postgres_on_small_disk() -> Iterator[tuple[str, Path]]:
    """A PostgreSQL URL whose schema and tables live in a tablespace on a small local disk."""
    admin = _postgres_admin()
    try:
        data = Path(admin.execute("SHOW data_directory").fetchone()[0])
        if not data.is_dir():
            pytest.skip(f"PostgreSQL at {POSTGRES_URL} runs on another machine: its tablespace "
                        "cannot be put on a small local disk")  # fmt: skip
        name = f"t_{uuid.uuid4().hex[:12]}"
        with small_disk(owner=data.owner()) as folder:
            admin.execute(f"CREATE TABLESPACE {name} LOCATION '{folder}'")
            admin.execute(f'CREATE SCHEMA "{name}"')
            options = quote(f"-csearch_path={name} -cdefault_tablespace={name}")
            sep = "&" if "?" in POSTGRES_URL else "?"
            try:
                yield f"{POSTGRES_URL}{sep}options={options}", folder
            finally:
                admin.execute(f'DROP SCHEMA "{name}" CASCADE')
                admin.execute(f"DROP TABLESPACE {name}")
    finally:
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def disk_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """A database on a small disk of its own, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        with small_disk() as folder:
            yield f"sqlite:///{folder / 'tether.db'}", folder
    else:
        with postgres_on_small_disk() as found:
            yield found


@pytest.fixture
def sqlite_disk_url() -> Iterator[tuple[str, Path]]:
    """A SQLite database on a small disk of its own."""
    with small_disk() as folder:
        yield f"sqlite:///{folder / 'tether.db'}", folder


def fill(folder: Path) -> Path:
    """Write a ballast file until the file system has no byte left; returns its path."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (b"\1" * 65536, b"\1" * 4096, b"\1"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return ballast


def write_until_full(app: tether.App) -> list[int]:
    """Write state versions until the disk refuses one; returns the versions that committed."""
    committed = []
    for i in range(1000):
        try:
            committed.append(app.set_state("a1", {"i": i, "blob": "y" * FILL_BLOB}).version)
        except tether.StorageFull as exc:
            assert "disk is full" in str(exc)
            assert "free space" in str(exc)
            return committed
    raise AssertionError("1,000 writes fitted on a full disk")


@contextmanager
def full_app(url: str, folder: Path) -> Iterator[tuple[tether.App, Path]]:
    """An App with an agent, a run and a checkpoint, whose database disk is then filled up."""
    app = tether.App(url, require_types=False)
    try:
        app.create_agent("worker", "a1")
        app.initialize("a1")
        app.activate("a1")
        app.submit("a1", {"before": True})
        app.checkpoint("a1", "before")
        yield app, fill(folder)
    finally:
        app.close()


def test_a_write_on_a_full_disk_raises_storage_full_and_loses_nothing(
    disk_url: tuple[str, Path],
) -> None:
    with full_app(*disk_url) as (app, _ballast):
        before = app.state_versions("a1")

        committed = write_until_full(app)  # perhaps none: the disk may be full to the last byte

        versions = app.state_versions("a1")
        assert versions[: len(before)] == before
        assert [v.version for v in versions[len(before) :]] == committed
        assert app.get_state("a1").state == (
            {"i": len(committed) - 1, "blob": "y" * FILL_BLOB} if committed else before[-1].state
        )
        assert [r.input for r in app.list_runs(agent_id="a1")] == [{"before": True}]
        assert [c.name for c in app.list_checkpoints("a1")] == ["before"]
        assert app.get_agent("a1").lifecycle == tether.LifecycleState.ACTIVE


def test_the_same_app_writes_again_once_space_is_freed(disk_url: tuple[str, Path]) -> None:
    url, _folder = disk_url
    with full_app(*disk_url) as (app, ballast):
        write_until_full(app)
        version = app.get_agent("a1").version

        ballast.unlink()

        assert app.set_state("a1", {"after": True}).version == version + 1
        app.submit("a1", {"after": True})
        app.pause("a1", reason="space is back")
    with tether.App(url, require_types=False) as fresh:
        assert fresh.get_state("a1").state == {"after": True}
        assert len(fresh.list_runs(agent_id="a1")) == 2
        assert fresh.get_agent("a1").lifecycle == tether.LifecycleState.PAUSED


def test_every_kind_of_write_on_a_full_sqlite_disk_is_storage_full(
    sqlite_disk_url: tuple[str, Path],
) -> None:
    with full_app(*sqlite_disk_url) as (app, _ballast):
        write_until_full(app)

        with pytest.raises(tether.StorageFull, match="free space"):
            app.set_state("a1", {"blob": "x" * BIG_BLOB})
        with pytest.raises(tether.StorageFull, match="free space"):
            app.pause("a1", reason="x" * BIG_BLOB)
        with pytest.raises(tether.DatabaseUnavailable, match="free space"):
            app.create_agent("worker", "a2", {"blob": "x" * BIG_BLOB})


def test_the_cli_exits_69_saying_to_free_space(sqlite_disk_url: tuple[str, Path]) -> None:
    url, _folder = sqlite_disk_url
    with full_app(*sqlite_disk_url) as (app, ballast):
        write_until_full(app)
        invoke = cli_invoker("--db", url)

        result = invoke("agents", "pause", "a1", "--reason", "x" * BIG_BLOB)

        assert result.exit_code == 69, result.output
        line = error_line(result)
        assert "disk is full" in line and "free space" in line
        assert "schema" not in line
        ballast.unlink()
        ok(invoke("agents", "pause", "a1", "--reason", "space is back"))
        assert app.get_agent("a1").lifecycle == tether.LifecycleState.PAUSED


def test_opening_a_database_on_a_full_disk_does_not_blame_the_schema(
    sqlite_disk_url: tuple[str, Path],
) -> None:
    url, folder = sqlite_disk_url
    path = folder / "tether.db"
    with full_app(*sqlite_disk_url) as (_app, ballast):
        pass  # closing the last connection folds the WAL in and removes it, freeing space
    # With no process attached, SQLite rebuilds its shared-memory index from the WAL; a new
    # process must create it, which a full disk refuses (as an I/O error, not as "full").
    path.with_name(path.name + "-shm").unlink(missing_ok=True)
    fill(folder)

    def tether_cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TETHER_DATABASE_URL": url}
        env.pop("TETHER_APP", None)
        return subprocess.run(
            [sys.executable, "-m", "tether", *args],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip

    done = tether_cli("agents", "list", "-o", "ids")

    assert done.returncode == 69, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "free space" in done.stderr and "schema" not in done.stderr
    ballast.unlink()
    again = tether_cli("agents", "list", "-o", "ids")
    assert (again.returncode, again.stdout) == (0, "a1\n"), again.stderr


def test_a_worker_waits_out_a_full_disk_and_finishes_once_space_is_freed(
    disk_url: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    url, folder = disk_url
    calls: list[str] = []
    ballast: list[Path] = []
    app = tether.App(url)

    @app.agent("hoarder")
    def hoarder(ctx: tether.RunContext, task: dict) -> int:
        def gather() -> str:
            calls.append("gather")
            ballast.append(fill(folder))  # the disk fills up while the step runs
            return "x" * BIG_BLOB  # and its output has nowhere to go

        page = ctx.step(gather, name="gather")
        ctx.state["page"] = page
        return len(page)

    try:
        active_agent(app, "hoarder", "h1")
        run = app.submit("h1")
        caplog.set_level("WARNING", logger="tether")
        with background_worker(app, concurrency=1):
            deadline = time.monotonic() + 30
            while not any("disk is full" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the worker never reported the full disk"
                time.sleep(0.05)
            assert run.status() == tether.RunStatus.RUNNING  # it waits, holding its run
            ballast[0].unlink()  # space returns
            assert run.result(timeout=30) == BIG_BLOB
        assert calls == ["gather"]  # the finished step was written, not run again
    finally:
        app.close()
