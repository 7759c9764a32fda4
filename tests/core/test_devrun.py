"""`make run`'s set-up steps that a newcomer meets first: a port already taken, a database not yet created."""

from __future__ import annotations

import secrets
import socket

import psycopg
import pytest
from django.db import connection

from dumont import devrun


def test_a_taken_web_port_stops_make_run_naming_the_port(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            devrun.main(["--port", str(port), "--setup-only"])
    assert f"cannot bind 127.0.0.1:{port} (web, PORT)" in str(stopped.value)
    assert "PORT=" in str(stopped.value)


def test_a_derived_port_that_is_taken_is_replaced_by_a_free_one_and_said(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        chosen = devrun.pick_port(taken, "S3 server")
        assert chosen != taken and devrun.port_free(chosen)
    assert f"port {taken} (S3 server) is taken: using {chosen}" in capsys.readouterr().out


@pytest.mark.django_db
def test_a_database_that_does_not_exist_is_created(capsys):
    db = connection.settings_dict
    name = f"dumont_devrun_{secrets.token_hex(4)}"
    url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{name}"
    try:
        devrun.ensure_database(url)
        assert f"created database {name!r}" in capsys.readouterr().out
        psycopg.connect(url).close()  # it is there now
        devrun.ensure_database(url)  # and a second run leaves it alone
        assert capsys.readouterr().out == ""
    finally:
        with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_an_unreachable_database_server_says_what_to_do():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(SystemExit) as stopped:
            devrun.ensure_database(f"postgres://postgres@127.0.0.1:{port}/dumont")
    assert "cannot reach PostgreSQL at DATABASE_URL" in str(stopped.value)
    assert "unset DATABASE_URL" in str(stopped.value)
