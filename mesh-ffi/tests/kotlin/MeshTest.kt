// The Kotlin bindings against the real library on the JVM: a primary and a
// worker on 127.0.0.1 (mDNS off), paired with the code, a heartbeat with app
// metrics, a command run by a Kotlin handler, events in a Kotlin listener, a
// policy denial as a typed exception, and a clean stop.
// Run by mesh-ffi/test-bindings.sh; prints "N passed, N failed" last.

import java.nio.file.Files
import java.util.concurrent.CopyOnWriteArrayList
import kotlin.system.exitProcess
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import uniffi.mesh_ffi.*

var passed = 0
var failed = 0

fun check(name: String, ok: Boolean, detail: () -> String = { "" }) {
    if (ok) {
        passed++
        println("ok   $name")
    } else {
        failed++
        println("FAIL $name ${detail()}")
    }
}

inline fun <reified E : Throwable> expect(name: String, block: () -> Unit): E? {
    try {
        block()
    } catch (e: Throwable) {
        check(name, e is E) { "threw ${e::class.qualifiedName}: ${e.message}" }
        return e as? E
    }
    check(name, false) { "nothing was thrown" }
    return null
}

class Collector : EventListener {
    val events = CopyOnWriteArrayList<MeshEvent>()
    override fun onEvent(event: MeshEvent) {
        events.add(event)
    }
    fun kinds() = events.map { it.kind }
}

class Greet : CommandHandler {
    @Volatile var calls = 0
    override fun handle(argsJson: String): String {
        calls++
        val name = Regex("\"name\"\\s*:\\s*\"([^\"]*)\"").find(argsJson)?.groupValues?.get(1)
        return "{\"hello\":\"$name\",\"from\":\"kotlin\"}"
    }
}

class Transfers : TransferListener {
    val incoming = CopyOnWriteArrayList<FileTransfer>()
    val finished = CopyOnWriteArrayList<FileTransfer>()
    @Volatile var lastProgress = 0uL
    override fun onIncoming(transfer: FileTransfer) {
        incoming.add(transfer)
    }
    override fun onProgress(id: String, bytes: ULong, total: ULong) {
        lastProgress = bytes
    }
    override fun onFinished(transfer: FileTransfer) {
        finished.add(transfer)
    }
}

fun sha256(bytes: ByteArray): String =
    java.security.MessageDigest.getInstance("SHA-256").digest(bytes).joinToString("") { "%02x".format(it) }

class Notes : CommandHandler {
    override fun handle(argsJson: String): String = "{\"stored\":true}"
}

fun options(role: NodeRole, dir: String, name: String): NodeOptions =
    defaultOptions(role, dir).also {
        it.name = name
        it.deviceId = "hw-$name"
        it.listenAddr = "127.0.0.1:0"
        it.mdns = false
        it.heartbeatIntervalMs = 200uL
        it.commandTimeoutMs = 5000uL
    }

suspend fun eventually(what: String, cond: () -> Boolean) {
    try {
        withTimeout(10_000) { while (!cond()) delay(50) }
    } catch (e: Exception) {
        check(what, false) { "did not happen within 10 s" }
    }
}

fun main() {
    runBlocking { scenario() }
    runBlocking { meshScenario() }
    println("$passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}

suspend fun scenario() {
    val tmp = Files.createTempDirectory("mesh-kotlin").toString()

    // Bad input: typed errors, nothing started.
    expect<MeshException.InvalidInput>("a malformed listen address is InvalidInput") {
        MeshNode(options(NodeRole.WORKER, "$tmp/bad", "bad").also { it.listenAddr = "nowhere" })
    }

    val primary = MeshNode(options(NodeRole.PRIMARY, "$tmp/primary", "studio"))
    primary.registerHandler("notes.write", Notes())
    primary.start()
    val worker = MeshNode(options(NodeRole.WORKER, "$tmp/worker", "ktphone"))
    val greet = Greet()
    worker.registerHandler("greet", greet)
    worker.start()
    expect<MeshException.Unavailable>("a primary operation on a worker is Unavailable") {
        worker.pendingPairings()
    }
    val events = Collector()
    val subscription = primary.subscribe("*", events)

    // Pairing with the code.
    val ticket = worker.requestPairing(primary.connectString()!!)
    check("the worker gets a 6-digit code", ticket.code().length == 6 && ticket.code().all { it.isDigit() })
    eventually("the request reaches the primary") { primary.pendingPairings().isNotEmpty() }
    val pending = primary.pendingPairings()
    check("the primary lists the request", pending.size == 1 && pending[0].name == "ktphone")
    val wrong = if (ticket.code() == "000000") "000001" else "000000"
    try {
        primary.approvePairing(ticket.requestId(), wrong)
        check("a wrong code is refused", false) { "accepted" }
    } catch (e: MeshException.Pairing) {
        check("a wrong code is refused with MeshException.Pairing", true)
    }
    val device = primary.approvePairing(ticket.requestId(), ticket.code())
    check("approval with the right code pairs the worker", device == worker.nodeId())
    ticket.finished()
    check("the worker knows its primary", worker.pairedPrimary() == primary.nodeId())
    eventually("the worker connects") { worker.isConnected() }

    // A heartbeat with the app's metrics.
    worker.sendHeartbeat(
        Metrics(
            batteryPercent = 64.0, charging = false, cpuPercent = 30.0, memoryPercent = 50.0,
            diskFreeGb = 8.0, thermal = ThermalState.FAIR, lowPowerMode = false,
        )
    )
    eventually("the primary scores the heartbeat") {
        primary.devices().any { it.online && it.score != null }
    }
    check("the device is the worker", primary.devices().single().nodeId == worker.nodeId())

    // The primary runs the worker's Kotlin handler.
    val result = primary.runAction(worker.nodeId(), "greet", "{\"name\":\"kt\"}")
    check("the Kotlin handler ran", result.contains("\"hello\":\"kt\"") && greet.calls == 1) { result }
    check("ping answers", primary.ping(worker.nodeId()) > 0uL)
    try {
        primary.runAction(worker.nodeId(), "missing", "{}")
        check("an unknown action fails", false)
    } catch (e: MeshException.CommandFailed) {
        check("an unknown action is CommandFailed(unknown_action)", e.code == "unknown_action") { e.code }
    }

    // Worker → primary under the policy.
    primary.setPolicy(worker.nodeId(), "{\"allowed_commands\": [\"notes.*\"]}")
    val stored = worker.sendCommand("notes.write", "{\"text\":\"hi\"}")
    check("an allowed command runs the primary's handler", stored.contains("stored")) { stored }
    try {
        worker.sendCommand("system.shutdown", "{}")
        check("a denied command throws", false)
    } catch (e: MeshException.PolicyDenied) {
        check("a denied command is PolicyDenied(command_not_allowed)", e.code == "command_not_allowed") { e.code }
    }
    val decision = primary.checkCommand(worker.nodeId(), "system.shutdown")
    check("checkCommand resolves the policy", decision.verdict == "deny" && decision.code == "command_not_allowed")

    // Files: the primary sends one to the worker, checked by hash.
    val data = ByteArray(2 * 1024 * 1024 + 5) { ((it * 31) % 253).toByte() }
    val src = java.io.File("$tmp/song.bin").also { it.writeBytes(data) }
    try {
        primary.sendFile(src.path, worker.nodeId())
        check("a device without files:write is refused", false)
    } catch (e: MeshException.File) {
        check("a device without files:write is File(forbidden)", e.code == "forbidden") { e.code }
    }
    primary.setScopes(worker.nodeId(), listOf("presence:write", "events:write", "commands:run", "files:write"))
    primary.setPolicy(worker.nodeId(), "{\"allowed_commands\": [\"notes.*\", \"files.send\"]}")
    val transfers = Transfers()
    val filesSub = worker.subscribeTransfers(transfers)
    val sent = primary.sendFile(src.path, worker.nodeId())
    check("sendFile returns the transfer", sent.size == data.size.toULong() && sent.name == "song.bin" && sent.direction == "out")
    eventually("the offer reaches the worker") { worker.transfers().any { it.id == sent.id } }
    val got = worker.waitTransfer(sent.id)
    check("the worker holds the file", got.state == "done" && got.direction == "in" && got.hash == sent.hash) { got.toString() }
    val landed = java.io.File(got.path!!).readBytes()
    check("the file's SHA-256 matches", sha256(landed) == sha256(data))
    eventually("the listener saw it arrive and end") { transfers.finished.any { it.id == sent.id } }
    check("the listener saw it coming", transfers.incoming.any { it.id == sent.id })
    check("progress reached the size", transfers.lastProgress == data.size.toULong()) { transfers.lastProgress.toString() }
    expect<MeshException.InvalidInput>("a malformed transfer id is InvalidInput") { worker.transfer("nope") }
    filesSub.close()

    // Media: refused without media:write; then the primary streams 30
    // video frames in real time to the worker, which reads them in order.
    try {
        primary.openMedia(worker.nodeId(), 3u, MediaType.VIDEO, "h264")
        check("media without media:write is refused", false)
    } catch (e: MeshException.File) {
        check("media without media:write is File(forbidden)", e.code == "forbidden") { e.code }
    }
    primary.setScopes(worker.nodeId(), listOf("presence:write", "events:write", "commands:run", "files:write", "media:write"))
    val inbox = worker.mediaInbox()
    val video = primary.openMedia(worker.nodeId(), 4u, MediaType.VIDEO, "h264")
    val stream = inbox.next(10_000uL)
    check("the stream arrives with its kind and codec",
        stream.peer() == primary.nodeId() && stream.streamId() == 4u && stream.mediaType() == MediaType.VIDEO && stream.codec() == "h264")
    val t0 = System.nanoTime()
    for (i in 0 until 30) {
        while (System.nanoTime() - t0 < i * 33_333_000L) Thread.sleep(1)
        val ts = ((System.nanoTime() - t0) / 1000).toULong()
        check("frame $i is taken", video.send(ts, i % 15 == 0, ByteArray(1000) { i.toByte() }))
    }
    video.end()
    eventually("the writer counted 30 frames") { video.counts() == MediaSendCounts(30uL, 0uL) }
    val seqs = mutableListOf<ULong>()
    while (true) {
        val item = stream.next(10_000uL) ?: break
        when (item) {
            is MediaItem.Frame -> {
                check("frame ${item.frame.seq} carries its bytes",
                    item.frame.payload.size == 1000 && item.frame.payload[0] == item.frame.seq.toByte())
                seqs.add(item.frame.seq)
            }
            is MediaItem.Gap -> check("no gap on loopback", false) { item.toString() }
        }
    }
    check("all 30 frames in order", seqs == (0uL until 30uL).toList()) { seqs.toString() }
    val st = stream.stats()
    check("the receiver's counters", st.received == 30uL && st.delivered == 30uL && st.lost == 0uL && st.tooOld == 0uL) { st.toString() }

    // Events reached the Kotlin listener; closing stops delivery.
    val kinds = events.kinds()
    for (kind in listOf("pairing.request_received", "pairing.approved", "peer.joined")) {
        check("the listener saw $kind", kind in kinds) { kinds.toString() }
    }
    subscription.close()
    val seen = events.events.size
    primary.revoke(worker.nodeId())
    eventually("the revoked worker is disconnected") { !worker.isConnected() }
    check("no events after close()", events.events.size == seen)

    worker.stop()
    primary.stop()
    check("stopped cleanly", !primary.status().running && !worker.status().running)
    worker.close()
    primary.close()
}

class Inbox : TopicListener {
    val messages = CopyOnWriteArrayList<MeshMessage>()
    override fun onMessage(message: MeshMessage) {
        messages.add(message)
    }
}

class Changes : ReplicaListener {
    val items = CopyOnWriteArrayList<ReplicaChange>()
    override fun onChange(change: ReplicaChange) {
        items.add(change)
    }
}

suspend fun until(what: String, cond: suspend () -> Boolean) {
    try {
        withTimeout(10_000) { while (!cond()) delay(50) }
        check(what, true)
    } catch (e: Exception) {
        check(what, false) { "did not happen within 10 s" }
    }
}

// The mesh of nodes: tokens, joining, members, a broadcast to a Kotlin
// listener, typed join errors.
suspend fun meshScenario() {
    val tmp = Files.createTempDirectory("mesh-kotlin-mesh").toString()
    val a = MeshNode(options(NodeRole.PRIMARY, "$tmp/a", "kt-a"))
    val b = MeshNode(options(NodeRole.PRIMARY, "$tmp/b", "kt-b"))
    val c = MeshNode(options(NodeRole.PRIMARY, "$tmp/c", "kt-c"))
    for (n in listOf(a, b, c)) n.start()
    val token = a.meshToken(null)
    check("a token is mj1. text of at most 256 characters", token.token.startsWith("mj1.") && token.token.length <= 256)
    check("the token names its issuer", token.issuer == a.nodeId())
    try {
        b.joinMesh("mj1.garbage")
        check("a malformed token is refused", false)
    } catch (e: MeshException.Join) {
        check("a malformed token is Join(token_invalid)", e.code == "token_invalid") { e.code }
    }
    check("nothing joined", b.meshPeers().peers.isEmpty())
    check("joining through a's token gives its member list", b.joinMesh(token.token) == 1u)
    try {
        c.joinMesh(token.token)
        check("a used token is refused", false)
    } catch (e: MeshException.Join) {
        check("a used token is Join(token_used)", e.code == "token_used") { e.code }
    }
    check("c joins through b's token", c.joinMesh(b.meshToken(60_000uL).token) >= 2u)
    until("all three see each other active") {
        listOf(a, b, c).all { n -> n.meshPeers().peers.count { it.status == "active" } == 2 }
    }
    val view = a.meshPeers()
    check("the peers are named", view.peers.map { it.name }.toSet() == setOf("kt-b", "kt-c")) { view.toString() }
    val inbox = Inbox()
    val sub = b.subscribeTopic("chat/*", inbox)
    val id = c.broadcast("chat/general", "hello from kotlin".toByteArray())
    until("the broadcast reaches the Kotlin listener") { inbox.messages.size >= 1 }
    val got = inbox.messages.firstOrNull()
    check(
        "the broadcast arrives whole, from its origin",
        got != null && String(got.body) == "hello from kotlin" && got.origin == c.nodeId() && got.id == id,
    ) { got.toString() }
    delay(300)
    check("each broadcast arrives once", inbox.messages.size == 1) { inbox.messages.size.toString() }
    sub.close()

    // Replicated state: a put reaches the other members' get and a Kotlin
    // listener; a delete likewise; typed errors.
    val changes = Changes()
    val replicaSub = b.subscribeReplicated("notes", changes)
    val version = a.replicatedPut("notes", "todo/1", "buy milk".toByteArray())
    check("the put's version names its writer", version.node == a.nodeId() && version.hlc.contains("."))
    until("the change reaches the Kotlin listener") { changes.items.size >= 1 }
    val change = changes.items.firstOrNull()
    check(
        "the change arrives whole, as a member's",
        change != null && change.key == "todo/1" && String(change.value!!) == "buy milk" && !change.local && change.version == version,
    ) { change.toString() }
    until("c gets the value") { c.replicatedGet("notes", "todo/1")?.value?.let { String(it) } == "buy milk" }
    check("c deletes it", c.replicatedDelete("notes", "todo/1"))
    until("the delete reaches b") { b.replicatedGet("notes", "todo/1") == null }
    until("the listener hears the delete") { changes.items.size >= 2 && changes.items[1].value == null }
    replicaSub.close()
    val entry = b.meshConfigSet("theme", "{\"dark\": true}")
    check("config set answers the value", entry.valueJson == "{\"dark\":true}") { entry.valueJson }
    until("the config reaches a") { a.meshConfigList("").any { it.key == "theme" } }
    expect<MeshException.NotFound>("an unset config key is NotFound") { a.meshConfigGet("nope") }
    expect<MeshException.InvalidInput>("a bad namespace is InvalidInput") {
        a.replicatedPut("Bad:Name", "k", "v".toByteArray())
    }
    check("sync status lists the other members", a.syncStatus().map { it.nodeId }.toSet() == setOf(b.nodeId(), c.nodeId()))
    for (n in listOf(a, b, c)) {
        n.stop()
        n.close()
    }
}
