"""The Sentinel and Cluster harness (tests/redis_topology.py) itself, with redis-py only: a write
survives the SIGKILL of its master and the failover that follows, with and without passwords, and a
set leaves no process or folder behind."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from tests.redis_topology import ClusterSet, SentinelSet

pytestmark = pytest.mark.slow

KEY = "gw:written-before-the-kill"
VALUE = b"still here"
FAILOVER_BOUND_S = 30  # measured 2.2-3.5 s on a 2-core machine, idle or with both cores busy


def hosts(url: str) -> list[tuple[str, int]]:
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    return [(host, int(port)) for host, _, port in (pair.rpartition(":") for pair in netloc.split(","))]


def close(sentinel: Sentinel, *clients: redis.Redis) -> None:
    for client in [*clients, *sentinel.sentinels]:
        client.close()


def test_a_write_to_the_sentinel_master_is_read_from_the_new_master(
    sentinel_set: Callable[..., SentinelSet],
) -> None:
    topology = sentinel_set()
    assert topology.sentinel_url() == "redis+sentinel://{}/gw-master/0".format(
        ",".join(f"127.0.0.1:{port}" for _, port in topology.sentinel_addresses)
    )
    sentinel = Sentinel(topology.sentinel_addresses, socket_timeout=2)
    master = sentinel.master_for(topology.master_name, socket_timeout=2)
    try:
        old = topology.master_address()
        master.set(KEY, VALUE)
        topology.wait_replicated()
        topology.kill_master()
        seconds = topology.wait_failover(timeout=FAILOVER_BOUND_S)
        print(f"sentinel failover: {seconds:.2f} s")
        assert topology.master_address() != old, f"failover of {seconds:.2f} s"
        assert sentinel.discover_master(topology.master_name) == topology.master_address()
        assert master.get(KEY) == VALUE, f"lost in a failover of {seconds:.2f} s"
    finally:
        close(sentinel, master)


def test_a_password_protected_sentinel_set_fails_over_and_takes_the_old_master_back(
    sentinel_set: Callable[..., SentinelSet],
) -> None:
    password, sentinel_password = "gw:pa@ss/word", "sentinel:pa@ss"
    topology = sentinel_set(password=password, sentinel_password=sentinel_password)
    url = urlsplit(topology.sentinel_url(db=3))
    assert (url.scheme, unquote(url.password or ""), url.path) == ("redis+sentinel", password, "/gw-master/3")
    assert parse_qs(url.query) == {"sentinel_password": [sentinel_password]}
    assert hosts(topology.sentinel_url()) == topology.sentinel_addresses
    for host, port in (topology.master.address, topology.sentinel_addresses[0]):
        with redis.Redis(host=host, port=port, socket_timeout=2) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()

    sentinel = Sentinel(topology.sentinel_addresses, sentinel_kwargs={"password": sentinel_password}, socket_timeout=2)
    master = sentinel.master_for(topology.master_name, password=password, socket_timeout=2)
    replica = sentinel.slave_for(topology.master_name, password=password, socket_timeout=2)
    try:
        master.set(KEY, VALUE)
        topology.wait_replicated()
        old_port = topology.master.port
        topology.kill_master()
        seconds = topology.wait_failover(timeout=FAILOVER_BOUND_S)
        print(f"sentinel failover with passwords: {seconds:.2f} s")
        assert master.get(KEY) == VALUE, f"lost in a failover of {seconds:.2f} s"

        rejoined = topology.restart_old_master()
        print(f"old master back as a replica: {rejoined:.2f} s")
        assert topology.replica.port == old_port
        assert sentinel.discover_slaves(topology.master_name) == [topology.replica.address]
        assert replica.get(KEY) == VALUE, f"the old master rejoined in {rejoined:.2f} s without the key"
    finally:
        close(sentinel, master, replica)


@pytest.mark.parametrize("password", [None, "gw:cl@ster/pass"], ids=["open", "password"])
def test_a_cluster_key_survives_the_kill_of_its_slot_owner(
    cluster_set: Callable[..., ClusterSet], password: str | None
) -> None:
    topology = cluster_set(password=password)
    url = urlsplit(topology.cluster_url())
    assert (url.scheme, url.path, url.password and unquote(url.password)) == ("redis+cluster", "/0", password)
    assert hosts(topology.cluster_url()) == topology.seed_nodes
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in topology.seed_nodes],
        password=password,
        socket_timeout=2,
    )
    try:
        client.set(KEY, VALUE)
        topology.wait_replicated()
        owner = topology.owner_of(KEY)
        topology.kill_owner_of(KEY)
        seconds = topology.wait_failover(KEY, timeout=FAILOVER_BOUND_S)
        print(f"cluster failover: {seconds:.2f} s")
        assert topology.owner_of(KEY).port != owner.port
        assert client.get(KEY) == VALUE, f"lost in a failover of {seconds:.2f} s"
        states = topology.cluster_states()
        assert list(states.values()) == ["ok"] * 5, f"{states} after a failover of {seconds:.2f} s"
    finally:
        client.close()


def test_a_set_leaves_no_process_or_folder_behind() -> None:
    with ClusterSet() as topology:
        topology.kill_owner_of(KEY)
        processes = [node.process for node in topology.nodes]
    assert all(process is not None and process.poll() is not None for process in processes)
    assert not topology.folder.exists()
