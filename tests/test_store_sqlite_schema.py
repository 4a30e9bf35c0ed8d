"""The SQLite store's file (app/store/sqlite_schema.py): an older schema is migrated in place, in
one transaction; a file of a newer gateway or of another application is refused, untouched; the
file and the directory we create are the owner's alone."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.auth.records import TeamRecord
from app.store import sqlite_schema
from app.store.base import StoreError
from app.store.sqlite import SqliteStore
from app.store.sqlite_schema import MIGRATIONS

pytestmark = pytest.mark.anyio
NEXT = ("ALTER TABLE teams ADD COLUMN note TEXT", "CREATE TABLE extra (x INTEGER)")  # a made-up next version


async def a_file_of_today(path: Path) -> None:
    store = SqliteStore(path)
    try:
        assert await store.create_team(TeamRecord(name="ml", rpm=10))
    finally:
        await store.close()


def pragma(path: Path, name: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"PRAGMA {name}").fetchone()[0])


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


async def test_a_file_of_an_earlier_schema_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    await a_file_of_today(path)
    assert pragma(path, "user_version") == len(MIGRATIONS)
    for _ in range(2):  # the second time it is up to date: nothing is applied again
        sqlite_schema.connect(path, 1.0, migrations=[*MIGRATIONS, NEXT]).close()
        assert pragma(path, "user_version") == len(MIGRATIONS) + 1
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name, note FROM teams").fetchall() == [("ml", None)]  # kept, with the new column
    assert "extra" in tables(path)


async def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    await a_file_of_today(path)
    broken = ("CREATE TABLE third (x INTEGER)", "ALTER TABLE nowhere ADD COLUMN y")
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        sqlite_schema.connect(path, 1.0, migrations=[*MIGRATIONS, NEXT, broken])
    assert pragma(path, "user_version") == len(MIGRATIONS)  # not even NEXT: one transaction for all
    assert not {"extra", "third"} & tables(path)
    store = SqliteStore(path)  # and today's gateway still uses it
    try:
        assert (await store.get_team("ml")) is not None
    finally:
        await store.close()


async def test_a_file_made_before_the_marker_is_ours_and_brought_up_to_date(tmp_path: Path) -> None:
    """Schema-1 files were made without the application id: their tables say they are ours, and
    today's gateway migrates them (schema 2 added the sweep's turn and the expiry indexes)."""
    path = tmp_path / "gateway.db"
    sqlite_schema.connect(path, 1.0, migrations=MIGRATIONS[:1]).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA application_id = 0")
        db.execute("INSERT INTO teams VALUES ('ml', ?)", (TeamRecord(name="ml").model_dump_json(),))
    assert "marks" not in tables(path)
    store = SqliteStore(path)
    try:
        assert (await store.get_team("ml")) is not None
        assert await store.sweep() == 0  # the marks table is there: the sweep takes its turn
    finally:
        await store.close()
    assert pragma(path, "user_version") == len(MIGRATIONS) and "marks" in tables(path)
    assert pragma(path, "application_id") == sqlite_schema.APPLICATION_ID  # marked once migrated


async def test_a_file_of_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    await a_file_of_today(path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    store = SqliteStore(path)
    try:
        with pytest.raises(StoreError, match=rf"sqlite {path}: made by a newer gateway \(schema version 99;"):
            await store.ping()
        with pytest.raises(StoreError, match="newer gateway"):
            await store.get_team("ml")
    finally:
        await store.close()
    assert pragma(path, "user_version") == 99


@pytest.mark.parametrize("user_version", [0, 1, 7])
async def test_a_database_of_another_application_is_refused_untouched(tmp_path: Path, user_version: int) -> None:
    path = tmp_path / "notes.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute(f"PRAGMA user_version = {user_version}")
    store = SqliteStore(path)
    try:
        with pytest.raises(StoreError, match=rf"sqlite {path}: not a database of this gateway"):
            await store.ping()
    finally:
        await store.close()
    assert tables(path) == {"notes"} and pragma(path, "user_version") == user_version


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are made readable by every local user."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_what_we_create_only_its_owner_can_read(tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "state" / "data"
    store = SqliteStore(data / "gateway.db")
    try:
        await store.create_team(TeamRecord(name="ml"))
        assert mode(data) == 0o700
        for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
            assert mode(data / name) == 0o600, name
    finally:
        await store.close()


async def test_a_directory_the_user_made_is_left_as_it_is(tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    store = SqliteStore(data / "gateway.db")
    try:
        await store.ping()
    finally:
        await store.close()
    assert mode(data) == 0o750 and mode(data / "gateway.db") == 0o600
