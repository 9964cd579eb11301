"""Which Ray a job uses: RAY_ADDRESS, else the recorded head only while it answers."""

from __future__ import annotations

import socket

import pytest

from voxtral.ray_utils import cluster_to_join, is_alive, recorded_cluster


@pytest.fixture
def ray_tmp(tmp_path, monkeypatch):
    """A private Ray temp folder, where ``ray start`` would record its head."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray"


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_is_alive(listener):
    assert is_alive(listener)
    assert not is_alive(closed_port())
    assert not is_alive("not-an-address")


def test_nothing_recorded_starts_local(ray_tmp):
    assert recorded_cluster() is None
    assert cluster_to_join() == (None, "no cluster recorded on this machine")


def test_a_live_recorded_head_is_joined(ray_tmp, listener):
    (ray_tmp / "ray_current_cluster").write_text(listener)
    address, why = cluster_to_join()
    assert address == listener and "ray start" in why


def test_a_dead_recorded_head_is_passed_over(ray_tmp):
    dead = closed_port()
    (ray_tmp / "ray_current_cluster").write_text(dead)
    address, why = cluster_to_join()
    assert address is None and dead in why and "does not answer" in why


def test_ray_address_wins_even_over_a_live_head(ray_tmp, listener, monkeypatch):
    (ray_tmp / "ray_current_cluster").write_text(listener)
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    assert cluster_to_join() == ("ray://10.0.0.1:10001", "RAY_ADDRESS")
