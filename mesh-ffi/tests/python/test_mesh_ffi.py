"""The Python bindings against the real library: a primary and a worker on
127.0.0.1 (mDNS off), paired with the code, a heartbeat with app metrics, a
command run by a Python handler, events in a Python listener, a policy
denial as a typed exception, and a clean stop.

Run by mesh-ffi/test-bindings.sh (generated module and .so side by side).
"""

import asyncio
import hashlib
import json
import tempfile
import threading
import time

import pytest

import mesh_ffi as m

WAIT_S = 10.0


class Collector(m.EventListener):
    """Keeps every event; wakes waiters."""

    def __init__(self):
        self.events = []
        self.cond = threading.Condition()

    def on_event(self, event):
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def kinds(self):
        with self.cond:
            return [e.kind for e in self.events]

    def wait_for(self, kind):
        with self.cond:
            ok = self.cond.wait_for(lambda: any(e.kind == kind for e in self.events), WAIT_S)
        assert ok, f"no {kind} event within {WAIT_S} s; got {self.kinds()}"


class Greet(m.CommandHandler):
    def __init__(self):
        self.calls = 0

    def handle(self, args_json):
        self.calls += 1
        args = json.loads(args_json)
        return json.dumps({"hello": args["name"], "from": "python"})


class Broken(m.CommandHandler):
    def handle(self, args_json):
        raise ValueError("a bug in the app's handler")


class Transfers(m.TransferListener):
    """Keeps transfers' progress and ends; wakes waiters."""

    def __init__(self):
        self.incoming, self.progress, self.finished = [], [], []
        self.cond = threading.Condition()

    def on_incoming(self, transfer):
        with self.cond:
            self.incoming.append(transfer)
            self.cond.notify_all()

    def on_progress(self, id, bytes, total):
        with self.cond:
            self.progress.append((id, bytes, total))
            self.cond.notify_all()

    def on_finished(self, transfer):
        with self.cond:
            self.finished.append(transfer)
            self.cond.notify_all()

    def wait_finished(self, id):
        with self.cond:
            ok = self.cond.wait_for(lambda: any(t.id == id for t in self.finished), WAIT_S)
        assert ok, f"transfer {id} did not end within {WAIT_S} s"
        return next(t for t in self.finished if t.id == id)


class Notes(m.CommandHandler):
    def handle(self, args_json):
        return json.dumps({"stored": json.loads(args_json)["text"]})


def options(role, data_dir, name):
    o = m.default_options(role, data_dir)
    o.name = name
    o.device_id = f"hw-{name}"
    o.listen_addr = "127.0.0.1:0"
    o.mdns = False
    o.heartbeat_interval_ms = 200
    o.command_timeout_ms = 5000
    return o


async def eventually(check, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {WAIT_S} s")


def test_bad_input_is_a_typed_error():
    with tempfile.TemporaryDirectory() as tmp:
        o = options(m.NodeRole.WORKER, tmp, "bad")
        o.listen_addr = "not an address"
        with pytest.raises(m.MeshError.InvalidInput):
            m.MeshNode(o)
        node = m.MeshNode(options(m.NodeRole.WORKER, tmp, "ok"))
        # Not started yet: a clear error, not a crash.
        with pytest.raises(m.MeshError.Unavailable):
            node.devices()
        node.start()
        # A primary operation on a worker.
        with pytest.raises(m.MeshError.Unavailable):
            node.pending_pairings()
        with pytest.raises(m.MeshError.InvalidInput):
            node.set_policy("not-a-node-id", "{}")
        asyncio.run(node.stop())


def test_primary_and_worker_pair_heartbeat_command_and_deny():
    asyncio.run(scenario())


async def scenario():
    with tempfile.TemporaryDirectory() as tmp:
        primary = m.MeshNode(options(m.NodeRole.PRIMARY, f"{tmp}/primary", "studio"))
        primary.register_handler("notes.write", Notes())
        primary.start()
        worker = m.MeshNode(options(m.NodeRole.WORKER, f"{tmp}/worker", "pyphone"))
        greet = Greet()
        worker.register_handler("greet", greet)
        worker.register_handler("broken", Broken())
        worker.start()
        events = Collector()
        subscription = primary.subscribe("*", events)

        # Pairing: the worker shows a code, the primary approves with it.
        ticket = await worker.request_pairing(primary.connect_string())
        assert len(ticket.code()) == 6 and ticket.code().isdigit()
        events.wait_for("pairing.request_received")
        pending = primary.pending_pairings()
        assert [p.request_id for p in pending] == [ticket.request_id()]
        assert pending[0].name == "pyphone"
        wrong = "000001" if ticket.code() == "000000" else "000000"
        with pytest.raises(m.MeshError.Pairing):
            await primary.approve_pairing(ticket.request_id(), wrong)
        device = await primary.approve_pairing(ticket.request_id(), ticket.code())
        assert device == worker.node_id()
        await ticket.finished()
        assert worker.paired_primary() == primary.node_id()
        await eventually(worker.is_connected, "the worker's session")

        # A heartbeat with the app's metrics; the primary scores it.
        await worker.send_heartbeat(
            m.Metrics(
                battery_percent=81.0,
                charging=True,
                cpu_percent=12.0,
                memory_percent=40.0,
                disk_free_gb=20.0,
                thermal=m.ThermalState.NOMINAL,
                low_power_mode=False,
            )
        )
        devices = await eventually(
            lambda: [d for d in primary.devices() if d.online and d.score is not None],
            "a scored, online device",
        )
        assert devices[0].node_id == worker.node_id()
        assert devices[0].platform == m.DevicePlatform.DESKTOP
        assert (await worker.status()).heartbeats_sent >= 1

        # The primary runs the worker's Python handler.
        result = json.loads(await primary.run_action(worker.node_id(), "greet", '{"name": "py"}'))
        assert result == {"hello": "py", "from": "python"}
        assert greet.calls == 1
        assert await primary.ping(worker.node_id()) > 0
        with pytest.raises(m.MeshError.CommandFailed) as failed:
            await primary.run_action(worker.node_id(), "broken", "{}")
        assert failed.value.code == "handler_failed"
        with pytest.raises(m.MeshError.CommandFailed) as unknown:
            await primary.run_action(worker.node_id(), "nope", "{}")
        assert unknown.value.code == "unknown_action"

        # Worker → primary: denied without a policy, then by the policy.
        with pytest.raises(m.MeshError.PolicyDenied):
            await worker.send_command("notes.write", '{"text": "hi"}')
        primary.set_policy(worker.node_id(), '{"allowed_commands": ["notes.*"]}')
        assert json.loads(primary.policy(worker.node_id()))["allowed_commands"] == ["notes.*"]
        stored = json.loads(await worker.send_command("notes.write", '{"text": "hi"}'))
        assert stored == {"stored": "hi"}
        with pytest.raises(m.MeshError.PolicyDenied) as denied:
            await worker.send_command("system.shutdown", "{}")
        assert denied.value.code == "command_not_allowed"
        decision = primary.check_command(worker.node_id(), "system.shutdown")
        assert decision.verdict == "deny" and decision.code == "command_not_allowed"
        assert primary.check_command(worker.node_id(), "notes.read").verdict == "allow"
        with pytest.raises(m.MeshError.InvalidInput):
            await worker.send_command("notes.write", "{not json")

        # Files: the worker sends one to the primary, checked by hash.
        data = bytes((i * 7919) % 251 for i in range(3 * 1024 * 1024 + 17))
        src = f"{tmp}/clip.bin"
        with open(src, "wb") as f:
            f.write(data)
        with pytest.raises(m.MeshError.File) as forbidden:
            await primary.send_file(src, worker.node_id())
        assert forbidden.value.code == "forbidden"
        primary.set_scopes(worker.node_id(), ["presence:write", "events:write", "commands:run", "files:write"])
        primary.set_policy(worker.node_id(), '{"allowed_commands": ["notes.*", "files.send"]}')
        incoming = Transfers()
        files_sub = primary.subscribe_transfers(incoming)
        sent = await worker.send_file(src, primary.node_id())
        assert sent.size == len(data) and sent.name == "clip.bin" and sent.direction == "out"
        done = incoming.wait_finished(sent.id)
        assert done.state == "done" and done.direction == "in" and done.hash == sent.hash
        with open(done.path, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        assert [t.id for t in incoming.incoming] == [sent.id]
        assert incoming.progress and incoming.progress[-1][2] == len(data)
        assert (await worker.wait_transfer(sent.id)).state == "done"
        assert primary.transfer(sent.id).name == "clip.bin"
        with pytest.raises(m.MeshError.InvalidInput):
            primary.transfer("not-an-id")
        with pytest.raises(m.MeshError.File) as ended:
            await worker.cancel_transfer(sent.id)
        assert ended.value.code == "already_ended"
        files_sub.cancel()

        # Media: refused without media:write; then the worker streams 40
        # audio frames in real time to the primary, which reads them in
        # order with their counters.
        with pytest.raises(m.MeshError.File) as no_media:
            await primary.open_media(worker.node_id(), 9, m.MediaType.AUDIO, "opus")
        assert no_media.value.code == "forbidden"
        primary.set_scopes(
            worker.node_id(),
            ["presence:write", "events:write", "commands:run", "files:write", "media:write"],
        )
        inbox = primary.media_inbox()
        sender = await worker.open_media(primary.node_id(), 7, m.MediaType.AUDIO, "opus")
        assert sender.stream_id() == 7
        stream = await inbox.next(int(WAIT_S * 1000))
        assert (stream.peer(), stream.stream_id(), stream.media_type(), stream.codec()) == (
            worker.node_id(), 7, m.MediaType.AUDIO, "opus")
        start = time.monotonic()
        for i in range(40):
            while time.monotonic() - start < i * 0.02:
                await asyncio.sleep(0.002)
            ts = int((time.monotonic() - start) * 1e6)
            assert sender.send(ts, False, bytes([i]) * 160)
        sender.end()
        await eventually(lambda: sender.counts().sent == 40, "the writer's count of 40 frames")
        assert sender.counts().dropped == 0
        with pytest.raises(m.MeshError.Unavailable):
            sender.send(0, False, b"after close")
        got = []
        while (item := await stream.next(int(WAIT_S * 1000))) is not None:
            assert isinstance(item, m.MediaItem.FRAME), item
            got.append(item.frame)
        assert [f.seq for f in got] == list(range(40))
        assert all(f.payload == bytes([f.seq]) * 160 for f in got)
        st = stream.stats()
        assert (st.received, st.delivered, st.lost, st.too_old) == (40, 40, 0, 0), st

        # Events reached the Python listener; closing stops delivery.
        kinds = events.kinds()
        for kind in ("pairing.request_received", "pairing.approved", "peer.joined"):
            assert kind in kinds, kinds
        subscription.cancel()
        seen = len(events.kinds())
        await primary.revoke(worker.node_id())
        await eventually(lambda: not worker.is_connected(), "the revoked worker's disconnection")
        assert len(events.kinds()) == seen

        await worker.stop()
        await primary.stop()
        assert not (await primary.status()).running


class Inbox(m.TopicListener):
    """Keeps every broadcast; wakes waiters."""

    def __init__(self):
        self.messages = []
        self.cond = threading.Condition()

    def on_message(self, message):
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def wait_for(self, n):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.messages) >= n, WAIT_S)
        assert ok, f"{len(self.messages)} of {n} broadcasts within {WAIT_S} s"


class Changes(m.ReplicaListener):
    """Keeps every replicated change; wakes waiters."""

    def __init__(self):
        self.items = []
        self.cond = threading.Condition()

    def on_change(self, change):
        with self.cond:
            self.items.append(change)
            self.cond.notify_all()

    def wait_for(self, n):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.items) >= n, WAIT_S)
        assert ok, f"{n} changes expected within {WAIT_S} s; got {len(self.items)}"


def test_mesh_tokens_join_peers_and_broadcasts():
    asyncio.run(mesh_scenario())


async def mesh_scenario():
    with tempfile.TemporaryDirectory() as tmp:
        a = m.MeshNode(options(m.NodeRole.PRIMARY, f"{tmp}/a", "py-a"))
        b = m.MeshNode(options(m.NodeRole.PRIMARY, f"{tmp}/b", "py-b"))
        c = m.MeshNode(options(m.NodeRole.PRIMARY, f"{tmp}/c", "py-c"))
        for n in (a, b, c):
            n.start()
        token = await a.mesh_token(None)
        assert token.token.startswith("mj1.") and len(token.token) <= 256
        assert token.issuer == a.node_id()

        # Bad tokens: typed errors with the CLI's codes; nothing joined.
        with pytest.raises(m.MeshError.Join) as bad:
            await b.join_mesh("mj1.not-a-token")
        assert bad.value.code == "token_invalid"
        assert (await b.mesh_peers()).peers == []

        assert await b.join_mesh(token.token) == 1
        with pytest.raises(m.MeshError.Join) as used:
            await c.join_mesh(token.token)
        assert used.value.code == "token_used"
        assert [t.status for t in await a.mesh_tokens()] == ["used"]
        second = await b.mesh_token(60_000)
        assert await c.join_mesh(second.token) >= 2

        async def everyone_active():
            for n in (a, b, c):
                view = await n.mesh_peers()
                if sum(p.status == "active" for p in view.peers) != 2:
                    return False
            return True

        deadline = time.monotonic() + WAIT_S
        while not await everyone_active():
            assert time.monotonic() < deadline, "the three never saw each other active"
            await asyncio.sleep(0.05)
        view = await a.mesh_peers()
        assert view.node_id == a.node_id() and view.name == "py-a"
        assert {p.name for p in view.peers} == {"py-b", "py-c"}

        # A broadcast reaches each other member's listener once.
        inboxes = [Inbox(), Inbox()]
        subs = [a.subscribe_topic("chat/*", inboxes[0]), b.subscribe_topic("chat/*", inboxes[1])]
        msg_id = await c.broadcast("chat/general", b"hello from python")
        for inbox in inboxes:
            inbox.wait_for(1)
            got = inbox.messages[0]
            assert got.body == b"hello from python"
            assert got.origin == c.node_id() and got.id == msg_id
            assert got.topic == "chat/general"
        await asyncio.sleep(0.3)
        assert [len(i.messages) for i in inboxes] == [1, 1]
        with pytest.raises(m.MeshError.InvalidInput):
            await c.broadcast("$mesh/block", b"forged")
        for s in subs:
            s.cancel()

        await c.mesh_rename("py-c2")
        deadline = time.monotonic() + WAIT_S
        while "py-c2" not in {p.name for p in (await a.mesh_peers()).peers}:
            assert time.monotonic() < deadline, "the rename never reached a"
            await asyncio.sleep(0.05)

        # Replicated state: a put on one member reaches the others' get and
        # listeners; a delete likewise; typed errors for bad input.
        changes = Changes()
        sub = b.subscribe_replicated("notes", changes)
        version = await a.replicated_put("notes", "todo/1", b"buy milk")
        assert version.node == a.node_id() and "." in version.hlc
        changes.wait_for(1)
        got = changes.items[0]
        assert (got.namespace, got.key, got.value, got.local) == ("notes", "todo/1", b"buy milk", False)
        assert got.version == version
        deadline = time.monotonic() + WAIT_S
        while (await c.replicated_get("notes", "todo/1")) is None:
            assert time.monotonic() < deadline, "the put never reached c"
            await asyncio.sleep(0.05)
        value = await c.replicated_get("notes", "todo/1")
        assert value.value == b"buy milk" and value.version == version
        assert [v.key for v in await c.replicated_scan("notes", "todo/")] == ["todo/1"]
        assert await c.replicated_delete("notes", "todo/1") is True
        assert await c.replicated_delete("notes", "todo/1") is False
        changes.wait_for(2)
        assert changes.items[1].value is None and changes.items[1].key == "todo/1"
        assert await b.replicated_get("notes", "todo/1") is None
        sub.cancel()
        entry = await b.mesh_config_set("theme", '{"dark": true}')
        assert json.loads(entry.value_json) == {"dark": True}
        deadline = time.monotonic() + WAIT_S
        while not any(e.key == "theme" for e in await a.mesh_config_list("")):
            assert time.monotonic() < deadline, "the config never reached a"
            await asyncio.sleep(0.05)
        assert json.loads((await a.mesh_config_get("theme")).value_json) == {"dark": True}
        with pytest.raises(m.MeshError.NotFound):
            await a.mesh_config_get("nope")
        with pytest.raises(m.MeshError.InvalidInput):
            await a.mesh_config_set("theme", "{not json")
        with pytest.raises(m.MeshError.InvalidInput):
            await a.replicated_put("Bad:Name", "k", b"v")
        with pytest.raises(m.MeshError.InvalidInput):
            await a.replicated_put("notes", "big", bytes(70 * 1024))
        assert {p.node_id for p in await a.sync_status()} == {b.node_id(), c.node_id()}
        for n in (a, b, c):
            await n.stop()
