"""Redis Sentinel and Redis Cluster as real processes on loopback, for failover tests: start a set,
SIGKILL a master, and time how long until another node serves its data.

The URL forms the gateway accepts for them (`sentinel_url()`, `cluster_url()` build them):

    redis+sentinel://[:password@]host:port[,host:port...]/<master name>[/<db>][?sentinel_password=...]
        the sentinels to ask (any of them will do), the name of the monitored master and its
        database (0 if left out). The password is the master's and its replicas' (`requirepass`);
        `sentinel_password` is the sentinels' own (`requirepass` on a sentinel), if they have one.
    redis+cluster://[:password@]host:port[,host:port...][/0]
        seed nodes the cluster is discovered from (any subset will do); a cluster has database 0 only.

Passwords are percent-encoded. Redis replicates asynchronously: a write acknowledged just before its
master dies may be lost, so a test that wants a write to survive calls `wait_replicated()` first.
Missing redis-server or redis-cli skips these tests locally and fails them under CI=true, as in
tests/redis_server.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import redis

from tests.redis_node import HOST, Node, data_command, find_binary, free_port, poll


def _quoted(value: str) -> str:
    """A config file value, quoted as redis-server's parser (sdssplitargs) reads it."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _url_auth(password: str | None) -> str:
    return f":{quote(password, safe='')}@" if password else ""


class _Topology(ABC):
    """What both sets share: a temp folder, the processes in it, the last one killed, and cleanup.
    As a context manager it starts on entry and cleans up on exit (also when start() fails)."""

    def __init__(self, prefix: str) -> None:
        self.server = find_binary("redis-server")
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.nodes: list[Node] = []
        self.killed: Node | None = None
        self.killed_at = 0.0

    def node(self, name: str, command: Callable[[Node], list[str]], password: str | None) -> Node:
        node = Node(self.folder / name, command, password)
        self.nodes.append(node)
        return node

    @abstractmethod
    def start(self, timeout: float = 60) -> Self: ...

    def wait_replicated(self, timeout: float = 10) -> None:
        """Wait until every replica has every write its master had when called (Redis replicates
        asynchronously, so a write just before a kill may otherwise be lost, by design)."""
        targets: list[tuple[Node, int]] = []
        for master in [node for node in self.nodes if node.alive]:
            role = master.call("ROLE")
            if role[0] == "master":
                targets += [(self._by_port(int(port)), int(role[1])) for _, port, _ in role[2]]

        def caught_up() -> bool:
            return all(node.info("replication").get("slave_repl_offset", -1) >= offset for node, offset in targets)

        poll(caught_up, timeout, "the replicas to catch up")

    def _by_port(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def cleanup(self) -> None:
        """Kill every process (SIGTERM took a sentinel set 1.3 s to stop; nothing here is kept) and
        remove the folder."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()


class SentinelSet(_Topology):
    """A master, one replica and three sentinels (quorum 2) watching the master as `master_name`,
    tuned to fail over within seconds on loopback."""

    def __init__(
        self,
        password: str | None = None,
        sentinel_password: str | None = None,
        master_name: str = "gw-master",
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 3000,  # a failed election is retried after twice this
    ) -> None:
        # Not 1000: a sentinel reconnects to a node at most once a second, and a master it has just
        # switched to must answer within down-after or is declared down, and (the other sentinels'
        # "down" votes for the old master still counting) failed over again at once; seen in 1 of
        # ~10 failovers under load, promoting the restarted old master with its empty dataset.
        super().__init__("gateway-sentinel-")
        self.password = password
        self.sentinel_password = sentinel_password
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.master = self.node("master", data_command(self.server, password), password)
        self.replica = self.node("replica", self._replica_command, password)
        self.sentinels = [self.node(f"sentinel{i}", self._sentinel_command, sentinel_password) for i in range(3)]

    def _replica_command(self, node: Node) -> list[str]:
        return data_command(self.server, self.password, replicaof=f"{HOST} {self.master.port}")(node)

    def _sentinel_command(self, node: Node) -> list[str]:
        # each sentinel its own file: a sentinel rewrites it with what it learns
        name = self.master_name
        lines = [
            f"port {node.port}",
            f"bind {HOST}",
            f"dir {node.folder}",
            f"sentinel monitor {name} {HOST} {self.master.port} 2",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {_quoted(self.password)}")
        if self.sentinel_password:
            lines += [
                f"requirepass {_quoted(self.sentinel_password)}",
                f"sentinel sentinel-pass {_quoted(self.sentinel_password)}",
            ]
        config = node.folder / "sentinel.conf"
        config.write_text("\n".join(lines) + "\n")
        return [self.server, str(config), "--sentinel"]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [sentinel.address for sentinel in self.sentinels]

    def sentinel_url(self, db: int = 0) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        query = f"?sentinel_password={quote(self.sentinel_password, safe='')}" if self.sentinel_password else ""
        return f"redis+sentinel://{_url_auth(self.password)}{hosts}/{self.master_name}/{db}{query}"

    def start(self, timeout: float = 60) -> Self:
        """Start the master, the replica once the master answers, and the sentinels once the replica
        is in sync; return when every sentinel knows the master, its replica and both other sentinels."""
        self.master.start()
        self.replica.start()
        poll(lambda: self.replica.info("replication").get("master_link_status") == "up", timeout, "the replica's sync")
        for sentinel in self.sentinels:
            sentinel.start()
        poll(self._sentinels_agree, timeout, "every sentinel to know the master, the replica and the others")
        return self

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as conn:
                master = conn.sentinel_master(self.master_name)
                replicas = conn.sentinel_slaves(self.master_name)
            in_sync = [r["port"] for r in replicas if r["master-link-status"] == "ok" and not r["is_sdown"]]
            if master["port"] != self.master.port or not master["is_master"] or master["is_sdown"]:
                return False
            if master["num-other-sentinels"] != len(self.sentinels) - 1 or in_sync != [self.replica.port]:
                return False
        return True

    def master_address(self) -> tuple[str, int]:
        """The master's address as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                return self._named_by(sentinel)
            except redis.RedisError:
                continue
        raise AssertionError("no sentinel named the master")

    def _named_by(self, sentinel: Node) -> tuple[str, int]:
        with sentinel.client() as conn:
            host, port = conn.sentinel_get_master_addr_by_name(self.master_name)
        return str(host), int(port)

    def kill_master(self) -> float:
        """SIGKILL the current master; returns `time.monotonic()` at the kill."""
        self.killed = self._by_port(self.master_address()[1])
        self.killed_at = self.killed.kill()
        return self.killed_at

    def wait_failover(self, timeout: float = 30) -> float:
        """Wait until every sentinel names the surviving node as master and it answers as master;
        returns the seconds since `kill_master()`."""
        assert self.killed is not None, "kill_master() first"
        survivor = self.replica if self.killed is self.master else self.master

        def promoted() -> bool:
            named = {self._named_by(sentinel) for sentinel in self.sentinels}
            return named == {survivor.address} and survivor.call("ROLE")[0] == "master"

        poll(promoted, timeout, f"the sentinels to promote 127.0.0.1:{survivor.port}", self._roles)
        self.master, self.replica = survivor, self.killed
        return time.monotonic() - self.killed_at

    def restart_old_master(self, timeout: float = 60) -> float:
        """Start the killed master again on its port and wait until the sentinels made it a replica of
        the new master, in sync; returns the seconds that took (sentinels wait ~8 s before they
        reconfigure a node that came back claiming to be a master)."""
        assert self.killed is not None and self.killed is self.replica, "wait_failover() first"
        started = time.monotonic()
        self.killed.start(self.killed.port)
        poll(self._replica_in_sync, timeout, f"127.0.0.1:{self.killed.port} to rejoin as a replica", self._roles)
        self.killed = None
        return time.monotonic() - started

    def _roles(self) -> str:
        named = {sentinel.port: self._named_by(sentinel) for sentinel in self.sentinels}
        roles = {node.port: node.call("ROLE")[:4] for node in (self.master, self.replica) if node.alive}
        return f"the sentinels name {named}; ROLE by port: {roles}"

    def _replica_in_sync(self) -> bool:
        role = self.replica.call("ROLE")
        return role[0] == "slave" and int(role[2]) == self.master.port and role[3] == "connected"


class ClusterSet(_Topology):
    """Six cluster nodes, three masters with a replica each (made by `redis-cli --cluster create`),
    with a short `cluster-node-timeout` so a replica takes over within seconds on loopback."""

    def __init__(self, password: str | None = None, node_timeout_ms: int = 1000) -> None:
        self.cli = find_binary("redis-cli")  # before the folder is made: a skip would leave it behind
        super().__init__("gateway-cluster-")
        self.password = password
        options = {
            "cluster_enabled": "yes",
            "cluster_config_file": "nodes.conf",
            "cluster_node_timeout": str(node_timeout_ms),
        }

        def command(node: Node) -> list[str]:
            # the bus port is one of its own: port + 10000 (Redis's default) may be past 65535
            return data_command(self.server, password, **options, cluster_port=str(free_port()))(node)

        for i in range(6):
            self.node(f"node{i}", command, password)

    @property
    def seed_nodes(self) -> list[tuple[str, int]]:
        return [node.address for node in self.nodes]

    def cluster_url(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.seed_nodes)
        return f"redis+cluster://{_url_auth(self.password)}{hosts}/0"

    def start(self, timeout: float = 60) -> Self:
        """Start the nodes, join them into a cluster, and return when every node says the cluster is ok
        and knows every other node, and every replica is in sync with its master."""
        for node in self.nodes:
            node.start()
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
        addresses = [f"{host}:{port}" for host, port in self.seed_nodes]
        created = subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        poll(self._settled, timeout, "the cluster to settle", self.cluster_states)
        return self

    def _settled(self) -> bool:
        """Every node says the cluster is ok, knows all six nodes with none failing or in handshake,
        and sees three shards of a master and a replica; every replica's link to its master is up."""
        for node in self.nodes:
            known = node.call("CLUSTER NODES")
            if node.call("CLUSTER INFO")["cluster_state"] != "ok" or len(known) != len(self.nodes):
                return False
            if any(set(seen["flags"].split(",")) & {"fail", "fail?", "handshake", "noaddr"} for seen in known.values()):
                return False
            shards = [shard for shard in node.call("CLUSTER SHARDS") if shard["slots"]]
            if len(shards) != len(self.nodes) // 2:
                return False
            if any(sorted(n["role"] for n in s["nodes"]) != ["master", "replica"] for s in shards):
                return False
        return all(role[3] == "connected" for role in (node.call("ROLE") for node in self.nodes) if role[0] == "slave")

    def owner_of(self, key: str) -> Node:
        """The master serving `key`'s slot, as the first live node names it."""
        return self._owner(next(node for node in self.nodes if node.alive), key)

    def _owner(self, asked: Node, key: str) -> Node:
        slot = int(asked.call("CLUSTER KEYSLOT", key))
        for shard in asked.call("CLUSTER SHARDS"):
            ranges = shard["slots"]
            if any(start <= slot <= end for start, end in zip(ranges[::2], ranges[1::2], strict=True)):
                port = next(n["port"] for n in shard["nodes"] if n["role"] == "master")
                return self._by_port(port)
        raise AssertionError(f"no master serves slot {slot} according to 127.0.0.1:{asked.port}")

    def kill_owner_of(self, key: str) -> float:
        """SIGKILL the master serving `key`'s slot; returns `time.monotonic()` at the kill."""
        self.killed = self.owner_of(key)
        self.killed_at = self.killed.kill()
        return self.killed_at

    def wait_failover(self, key: str, timeout: float = 30) -> float:
        """Wait until every live node names a live master (its replica) for `key`'s slot, that master
        answers as one, and every live node says the cluster is ok; returns the seconds since
        `kill_owner_of()`."""
        assert self.killed is not None, "kill_owner_of() first"
        live = [node for node in self.nodes if node.alive]

        def taken_over() -> bool:
            owners = {self._owner(node, key) for node in live}
            if len(owners) != 1 or not all(owner.alive for owner in owners):
                return False
            return owners.pop().call("ROLE")[0] == "master" and set(self.cluster_states().values()) == {"ok"}

        def views() -> dict[int, tuple[int, str]]:
            """By port: the port of the owner each node names, and its cluster_state."""
            return {node.port: (self._owner(node, key).port, self.cluster_states()[node.port]) for node in live}

        poll(taken_over, timeout, f"a replica to take over from 127.0.0.1:{self.killed.port}", views)
        return time.monotonic() - self.killed_at

    def cluster_states(self) -> dict[int, str]:
        """`cluster_state` as each live node reports it, by port."""
        return {node.port: node.call("CLUSTER INFO")["cluster_state"] for node in self.nodes if node.alive}
