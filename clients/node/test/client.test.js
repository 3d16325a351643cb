// End-to-end tests of the Node client against a real codelane server subprocess.
//
// The server is `python -m codelane.cli server` (python from $CODELANE_PYTHON, default
// "python3"), on a free 127.0.0.1 port, with a scripted model, one local worker and a bearer
// token, over a temporary workspace. Every wait is bounded: the server must be up within
// SERVER_START_MS, every test has a timeout, every call and stream a deadline.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import * as protoLoader from '@grpc/proto-loader';

import { connect, grpc } from '../src/client.js';

const PYTHON = process.env.CODELANE_PYTHON || 'python3';
const PROTOS_DIR = fileURLToPath(new URL('../../../protos', import.meta.url));
const HOST = '127.0.0.1';
const TOKEN = 'node-test-token';
const SERVER_START_MS = 30_000;
const TEST_TIMEOUT_MS = 20_000;
const STREAM_TIMEOUT_MS = 15_000;

const NOTES = 'The greeting needs a comma.\n';

// One model response with a mix of Query calls (greps, reads) and an Execute call (write) whose
// file is read again right after it, then a final answer.
const SCRIPT = `responses:
  - text: "Looking around."
    tool_calls:
      - {name: grep, arguments: {pattern: "TODO", path: "."}}
      - {name: read, arguments: {file_path: "README.md"}}
      - {name: grep, arguments: {pattern: "def ", path: ".", output_mode: content}}
      - {name: read, arguments: {file_path: "app/greet.py"}}
      - {name: write, arguments: {file_path: "NOTES.md", content: ${JSON.stringify(NOTES)}}}
      - {name: read, arguments: {file_path: "NOTES.md"}}
  - text: "Done."
`;
const SCRIPT_TOOLS = ['grep', 'read', 'grep', 'read', 'write', 'read'];

let tmp;
let workspace;
let server; // { child, address, output() }
let client;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, HOST, () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function startServer(address, dataDir, scriptPath) {
  const args = ['-m', 'codelane.cli', 'server', '--listen', address, '--data-dir', dataDir,
    '--local-workers', '1', '--model', `scripted:${scriptPath}`, '--token', TOKEN];
  const child = spawn(PYTHON, args, { cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(
      `server not ready after ${SERVER_START_MS} ms:\n${output}`)), SERVER_START_MS);
    const onData = (chunk) => {
      output += chunk.toString();
      if (output.includes(`codelane server listening on ${address}`)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${PYTHON}: ${err.message}`));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited early (code ${code}, signal ${signal}):\n${output}`));
    });
  });
  return { child, address, ready, output: () => output };
}

function stopServer(child, graceMs = 5_000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      // 'exit' follows; resolve anyway after a bounded wait.
      setTimeout(resolve, 1_000).unref();
    }, graceMs);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

// Last resort if the runner exits without the after() hook (e.g. a crash): never leave a server.
process.on('exit', () => {
  if (server?.child && server.child.exitCode === null && server.child.signalCode === null) {
    server.child.kill('SIGKILL');
  }
});

async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}

function assertGapFree(events, first) {
  let expected = first;
  for (const ev of events) {
    assert.equal(typeof ev.sequence, 'bigint', 'sequence is a BigInt');
    assert.equal(ev.sequence, expected, `sequence ${ev.sequence} (${ev.kind}) should be ${expected}`);
    expected += 1n;
  }
}

// The session and the events of its one turn, shared by the tests (made once, on first use).
let turnPromise;
function runTurn() {
  turnPromise ??= (async () => {
    const session = await client.createSession({ workspace, labels: { suite: 'node-turn' } });
    const events = await collect(client.sendMessage(session.sessionId, 'Find the TODOs and take notes.',
      { timeoutMs: STREAM_TIMEOUT_MS }));
    return { session, events };
  })();
  return turnPromise;
}

before(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'codelane-node-'));
  workspace = path.join(tmp, 'workspace');
  fs.mkdirSync(path.join(workspace, 'app'), { recursive: true });
  fs.writeFileSync(path.join(workspace, 'README.md'), '# Greeter\n\nSays hello. TODO: punctuation.\n');
  fs.writeFileSync(path.join(workspace, 'app', 'greet.py'),
    'def greet(name):\n    # TODO: comma after Hello\n    return f"Hello {name}!"\n');
  const scriptPath = path.join(tmp, 'script.yaml');
  fs.writeFileSync(scriptPath, SCRIPT);
  const port = await freePort();
  server = startServer(`${HOST}:${port}`, path.join(tmp, 'data'), scriptPath);
  await server.ready;
  client = connect(server.address, { token: TOKEN, callTimeoutMs: 10_000 });
}, { timeout: SERVER_START_MS + 5_000 });

after(async () => {
  client?.close();
  await stopServer(server?.child);
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
}, { timeout: 15_000 });

describe('sessions', { timeout: TEST_TIMEOUT_MS }, () => {
  test('create, get and list sessions', async () => {
    const created = await client.createSession({ workspace, labels: { suite: 'node' } });
    assert.match(created.sessionId, /\S/);
    assert.equal(created.workspace, fs.realpathSync(workspace));
    assert.equal(created.state, 'SESSION_STATE_IDLE');
    assert.equal(created.lastSequence, 0n);
    assert.ok(created.createTime instanceof Date);
    assert.deepEqual(created.labels, { suite: 'node' });
    assert.match(created.config.model, /^scripted:/);

    const got = await client.getSession(created.sessionId);
    assert.equal(got.sessionId, created.sessionId);
    assert.equal(got.workspace, created.workspace);
    assert.deepEqual(got.labels, { suite: 'node' });

    const page = await client.listSessions({ pageSize: 100 });
    assert.ok(Array.isArray(page.sessions));
    assert.equal(typeof page.nextPageToken, 'string');
    assert.ok(page.sessions.some((s) => s.sessionId === created.sessionId), 'the new session is listed');

    await client.deleteSession(created.sessionId);
    await assert.rejects(client.getSession(created.sessionId), (err) => err.code === grpc.status.NOT_FOUND);
  });

  test('createSession with a missing workspace rejects with INVALID_ARGUMENT', async () => {
    await assert.rejects(
      client.createSession({ workspace: path.join(tmp, 'does-not-exist') }),
      (err) => {
        assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
        assert.equal(err.code, 3);
        assert.match(err.details, /workspace/);
        assert.equal(err.errorInfo?.metadata?.field, 'workspace');
        return true;
      },
    );
  });

  test('a call without the bearer token is UNAUTHENTICATED', async () => {
    const anonymous = connect(server.address, { callTimeoutMs: 10_000 });
    try {
      await assert.rejects(anonymous.listSessions(), (err) => err.code === grpc.status.UNAUTHENTICATED);
    } finally {
      anonymous.close();
    }
  });
});

describe('turns and events', { timeout: TEST_TIMEOUT_MS }, () => {
  test('sendMessage streams turn_started ... turn_finished, gap-free, one tool_call_finished per call', async () => {
    const { session, events } = await runTurn();
    assert.ok(events.length > 2);
    assert.equal(events[0].kind, 'turn_started');
    assert.equal(events[0].turnStarted.userText, 'Find the TODOs and take notes.');
    const last = events.at(-1);
    assert.equal(last.kind, 'turn_finished');
    assert.equal(last.turnFinished.stopReason, 'STOP_REASON_END_TURN');
    assert.equal(last.turnFinished.finalText, 'Done.');
    assert.equal(last.turnFinished.toolCalls, SCRIPT_TOOLS.length);
    assert.equal(events.filter((e) => e.kind === 'turn_finished').length, 1);

    assertGapFree(events, 1n);
    const turnId = events[0].turnId;
    assert.match(turnId, /\S/);
    for (const ev of events) {
      assert.equal(ev.sessionId, session.sessionId);
      assert.equal(ev.turnId, turnId);
      assert.ok(ev.time instanceof Date);
      assert.ok(ev[ev.kind.replace(/_([a-z])/g, (_, c) => c.toUpperCase())], `payload of ${ev.kind}`);
    }

    const started = events.filter((e) => e.kind === 'tool_call_started');
    const finished = events.filter((e) => e.kind === 'tool_call_finished');
    assert.equal(finished.length, SCRIPT_TOOLS.length, 'one tool_call_finished per call');
    const finishedIds = finished.map((e) => e.toolCallFinished.callId);
    assert.equal(new Set(finishedIds).size, finishedIds.length, 'no call finishes twice');
    assert.deepEqual(new Set(started.map((e) => e.toolCallStarted.call.callId)), new Set(finishedIds));
    assert.deepEqual(finished.map((e) => e.toolCallFinished.toolName).sort(), [...SCRIPT_TOOLS].sort());
    for (const ev of started) {
      assert.match(ev.toolCallStarted.workerId, /\S/);
      const expectedLane = ev.toolCallStarted.call.toolName === 'write' ? 'LANE_EXECUTE' : 'LANE_QUERY';
      assert.equal(ev.toolCallStarted.lane, expectedLane);
    }
    for (const ev of finished) {
      const { result } = ev.toolCallFinished;
      assert.equal(result.isError, false, `${ev.toolCallFinished.toolName}: ${result.output}`);
      assert.equal(typeof result.runTime, 'number');
    }
    // Each call's finish comes after its start.
    for (const ev of finished) {
      const start = started.find((s) => s.toolCallStarted.call.callId === ev.toolCallFinished.callId);
      assert.ok(start.sequence < ev.sequence);
    }

    // The write ran, and the read after it saw the new file.
    assert.equal(fs.readFileSync(path.join(workspace, 'NOTES.md'), 'utf8'), NOTES);
    const notesRead = finished.find((e) => e.toolCallFinished.toolName === 'read'
      && e.toolCallFinished.result.output.includes('comma'));
    assert.ok(notesRead, 'the read of NOTES.md after the write sees its content');

    const after = await client.getSession(session.sessionId);
    assert.equal(after.lastSequence, last.sequence);
    assert.equal(after.state, 'SESSION_STATE_IDLE');
  });

  test('watchEvents from 0 replays everything, then caught_up', async () => {
    const { session, events } = await runTurn();
    const watched = await collect(client.watchEvents(session.sessionId,
      { afterSequence: 0, follow: false, timeoutMs: STREAM_TIMEOUT_MS }));
    const marker = watched.at(-1);
    assert.deepEqual(marker, { kind: 'caught_up', lastSequence: events.at(-1).sequence });
    assert.deepEqual(watched.slice(0, -1), events);
  });

  test('watchEvents resumed from a middle sequence gives exactly the rest', async () => {
    const { session, events } = await runTurn();
    const middle = Math.floor(events.length / 2);
    const after = events[middle - 1].sequence; // a BigInt
    const rest = events.slice(middle);
    assert.ok(rest.length > 0 && rest.length < events.length);

    const watched = await collect(client.watchEvents(session.sessionId,
      { afterSequence: after, follow: false, timeoutMs: STREAM_TIMEOUT_MS }));
    assert.deepEqual(watched.slice(0, -1), rest);
    assert.deepEqual(watched.at(-1), { kind: 'caught_up', lastSequence: events.at(-1).sequence });
    assertGapFree(watched.slice(0, -1), after + 1n);

    // The same with follow: true (the default): leaving the loop at caught_up cancels the stream.
    const followed = [];
    for await (const item of client.watchEvents(session.sessionId,
      { afterSequence: String(after), timeoutMs: STREAM_TIMEOUT_MS })) {
      followed.push(item);
      if (item.kind === 'caught_up') break;
    }
    assert.deepEqual(followed, watched);

    // Beyond the end of the log: OUT_OF_RANGE.
    await assert.rejects(
      collect(client.watchEvents(session.sessionId,
        { afterSequence: events.at(-1).sequence + 100n, follow: false, timeoutMs: STREAM_TIMEOUT_MS })),
      (err) => err.code === grpc.status.OUT_OF_RANGE,
    );
  });

  test('stream errors and cancellation: late iteration, AbortSignal, cancel()', async () => {
    const { session, events } = await runTurn();

    // An error that arrives before the caller starts iterating is not lost.
    const missing = client.sendMessage('no-such-session', 'hello', { timeoutMs: STREAM_TIMEOUT_MS });
    await new Promise((r) => setTimeout(r, 300));
    await assert.rejects(collect(missing), (err) => err.code === grpc.status.NOT_FOUND
      && err.errorInfo?.metadata?.session_id === 'no-such-session');

    // follow: true stays open after caught_up until the signal aborts; then it ends quietly.
    const controller = new AbortController();
    const seen = [];
    for await (const item of client.watchEvents(session.sessionId,
      { afterSequence: 0n, signal: controller.signal, timeoutMs: STREAM_TIMEOUT_MS })) {
      seen.push(item);
      if (item.kind === 'caught_up') setTimeout(() => controller.abort(), 200);
    }
    assert.equal(seen.length, events.length + 1);
    assert.equal(seen.at(-1).kind, 'caught_up');

    // cancel() ends an unfinished stream quietly.
    const stream = client.watchEvents(session.sessionId, { timeoutMs: STREAM_TIMEOUT_MS });
    const first = await stream.next();
    assert.equal(first.value.sequence, 1n);
    stream.cancel();
    let rest = 0;
    for await (const _ of stream) rest++;
    assert.ok(rest <= events.length, 'ends after what was already received');
  });

  test('getMessages returns the history in order', async () => {
    const { session, events } = await runTurn();
    const messages = await client.getMessages(session.sessionId);
    // user, assistant with the calls, one tool message per call (in call order), final assistant.
    assert.equal(messages.length, 1 + 1 + SCRIPT_TOOLS.length + 1);
    messages.forEach((m, i) => assert.equal(m.index, BigInt(i + 1)));
    assert.equal(messages[0].role, 'MESSAGE_ROLE_USER');
    assert.equal(messages[0].text, 'Find the TODOs and take notes.');
    const assistant = messages[1];
    assert.equal(assistant.role, 'MESSAGE_ROLE_ASSISTANT');
    assert.equal(assistant.text, 'Looking around.');
    assert.deepEqual(assistant.toolCalls.map((c) => c.toolName), SCRIPT_TOOLS);
    const toolMessages = messages.slice(2, 2 + SCRIPT_TOOLS.length);
    assert.deepEqual(toolMessages.map((m) => m.role), SCRIPT_TOOLS.map(() => 'MESSAGE_ROLE_TOOL'));
    assert.deepEqual(toolMessages.map((m) => m.toolCallId), assistant.toolCalls.map((c) => c.callId));
    assert.ok(toolMessages.every((m) => m.toolResult && !m.toolResult.isError));
    assert.equal(messages.at(-1).role, 'MESSAGE_ROLE_ASSISTANT');
    assert.equal(messages.at(-1).text, 'Done.');
    const turnId = events[0].turnId;
    assert.ok(messages.every((m) => m.turnId === turnId));

    // An idle session has nothing to cancel.
    assert.deepEqual(await client.cancelTurn(session.sessionId), { cancelled: false });
  });
});

describe('int64 values are BigInts, exact beyond 2^53', () => {
  const MAX = 2n ** 63n - 1n;
  const methods = () => protoLoader.loadSync(['codelane/v1/session.proto'], {
    includeDirs: [PROTOS_DIR], longs: String, enums: String, defaults: true, oneofs: true,
  })['codelane.v1.SessionService'];

  test('decoding: a sequence of 2^63-1 from the wire', () => {
    const { WatchEvents } = methods();
    const bytes = WatchEvents.responseSerialize({ event: { sessionId: 's', sequence: MAX.toString(), turnStarted: {} } });
    const decoded = client._codec.decode('codelane.v1.WatchEventsResponse', WatchEvents.responseDeserialize(bytes));
    assert.equal(decoded.item, 'event');
    assert.equal(decoded.event.sequence, MAX);
    assert.equal(decoded.event.kind, 'turn_started');
  });

  test('encoding: afterSequence as BigInt, string or safe Number; unsafe Numbers refused', () => {
    const { WatchEvents } = methods();
    const roundTrip = (afterSequence) => WatchEvents.requestDeserialize(WatchEvents.requestSerialize(
      client._codec.encode('codelane.v1.WatchEventsRequest', { sessionId: 's', afterSequence }))).afterSequence;
    assert.equal(roundTrip(MAX), MAX.toString());
    assert.equal(roundTrip(MAX.toString()), MAX.toString());
    assert.equal(roundTrip(42), '42');
    assert.throws(() => client.watchEvents('s', { afterSequence: 2 ** 60 }), TypeError);
    assert.throws(() => client.watchEvents('s', { afterSequence: '12abc' }), TypeError);
  });
});

describe('admin', { timeout: TEST_TIMEOUT_MS }, () => {
  test('listWorkers and getQueueStats', async () => {
    await runTurn(); // the Query lane has run calls by now
    // The local worker dials the server right after it starts: poll briefly for it.
    let workers = [];
    for (let i = 0; i < 50 && workers.length === 0; i++) {
      workers = await client.listWorkers();
      if (workers.length === 0) await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(workers.length, 1);
    assert.ok(workers[0].tools.includes('grep'));
    assert.equal(typeof workers[0].completedCalls, 'bigint');

    const stats = await client.getQueueStats();
    assert.deepEqual(stats.lanes.map((l) => l.lane).sort(), ['LANE_EXECUTE', 'LANE_GENERATE', 'LANE_QUERY']);
    const execute = stats.lanes.find((l) => l.lane === 'LANE_EXECUTE');
    assert.ok(execute.completed >= 1n);
    assert.equal(typeof execute.latencyP50, 'number');
    assert.equal(stats.workers, 1);
  });
});
