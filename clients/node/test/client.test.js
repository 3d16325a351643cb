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
import { after, afterEach, before, describe, test } from 'node:test';

import * as protoLoader from '@grpc/proto-loader';

import { DEFAULT_ADDRESS, _resumeTiming, connect, grpc, serverFromEnv } from '../src/client.js';
import * as clientModule from '../src/client.js';

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

// Scripts of the permission and external-task sessions (JSON; one file each, chosen per session
// with `model: 'scripted:<path>'`).
const APPROVE_SCRIPT = {
  responses: [
    { text: 'Writing.', tool_calls: [{ name: 'write', arguments: { file_path: 'approved.txt', content: 'approved\n' } }] },
    { text: 'Done.' },
  ],
};
const REJECT_SCRIPT = {
  responses: [
    { text: 'Writing.', tool_calls: [{ name: 'write', arguments: { file_path: 'rejected.txt', content: 'rejected\n' } }] },
    { text: 'Done.' },
  ],
};
const EXTERNAL_SCRIPT = {
  responses: [
    {
      text: 'Running outside.',
      tool_calls: [
        { name: 'bash', arguments: { command: 'echo from-the-server' } },
        { name: 'write', arguments: { file_path: 'external.txt', content: 'never written here\n' } },
      ],
    },
    { text: 'Done.' },
  ],
};
const LEASE_SCRIPT = {
  responses: [
    { text: 'Writing.', tool_calls: [{ name: 'write', arguments: { file_path: 'leased.txt', content: 'x' } }] },
    { text: 'Done.' },
  ],
};
// A call whose handler gets stuck, then one that must still be claimed and run.
const GONE_SCRIPT = {
  responses: [
    { text: '', tool_calls: [{ name: 'bash', arguments: { command: 'stuck' } }] },
    { text: '', tool_calls: [{ name: 'bash', arguments: { command: 'next' } }] },
    { text: 'Done.' },
  ],
};
const scriptModels = {}; // name -> 'scripted:<path>'

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

// The server takes a free port itself (port 0) and says which: a port found free beforehand could
// be taken by another process before the server bound it.
function startServer(dataDir, scriptPath, extraArgs = []) {
  const args = ['-m', 'codelane.cli', 'server', '--listen', `${HOST}:0`, '--data-dir', dataDir,
    '--local-workers', '1', '--model', `scripted:${scriptPath}`, '--token', TOKEN,
    // The sessions of the tests name scripts of their own, written beside the default one.
    '--scripts-dir', path.dirname(scriptPath), ...extraArgs];
  const child = spawn(PYTHON, args, { cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(
      `server not ready after ${SERVER_START_MS} ms:\n${output}`)), SERVER_START_MS);
    const onData = (chunk) => {
      output += chunk.toString();
      const listening = /^codelane server listening on (\S+)$/m.exec(output);
      if (listening) {
        handle.address = listening[1];
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
  const handle = { child, address: undefined, ready, output: () => output }; // address: once ready
  started.push(handle);
  return handle;
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

// Last resort if the runner exits without the after() hooks (e.g. a crash): never leave a server.
const started = [];
process.on('exit', () => {
  for (const { child } of started) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
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
  for (const [name, script] of Object.entries({
    approve: APPROVE_SCRIPT, reject: REJECT_SCRIPT, external: EXTERNAL_SCRIPT, lease: LEASE_SCRIPT, gone: GONE_SCRIPT,
  })) {
    const file = path.join(tmp, `script-${name}.json`);
    fs.writeFileSync(file, JSON.stringify(script));
    scriptModels[name] = `scripted:${file}`;
  }
  server = startServer(path.join(tmp, 'data'), scriptPath);
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
    const created = await client.createSession({ workspace, labels: { suite: 'node' }, maxOutputTokens: 4096 });
    assert.match(created.sessionId, /\S/);
    assert.equal(created.workspace, fs.realpathSync(workspace));
    assert.equal(created.state, 'SESSION_STATE_IDLE');
    assert.equal(created.lastSequence, 0n);
    assert.ok(created.createTime instanceof Date);
    assert.deepEqual(created.labels, { suite: 'node' });
    assert.match(created.config.model, /^scripted:/);
    assert.equal(created.config.maxOutputTokens, 4096);

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

  test('createSession refuses a misspelt option, naming it and the known ones, and creates nothing', async () => {
    await assert.rejects(
      client.createSession({ workspace, externalTaskTimout: 5, systemPromt: 'x', labels: { suite: 'node-typo' } }),
      (err) => {
        assert.ok(err instanceof TypeError, String(err));
        assert.match(err.message, /^createSession: unknown keys 'externalTaskTimout', 'systemPromt'; known: workspace, /);
        assert.match(err.message, /\bexternalTaskTimeout\b.*\bsystemPrompt\b|\bsystemPrompt\b.*\bexternalTaskTimeout\b/);
        return true;
      },
    );
    const sessions = [];
    let pageToken = '';
    do {
      const page = await client.listSessions({ pageSize: 100, pageToken });
      sessions.push(...page.sessions);
      pageToken = page.nextPageToken;
    } while (pageToken);
    assert.deepEqual(sessions.filter((s) => s.labels.suite === 'node-typo'), [], 'no session was created');
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

  test('close() ends the streams still open with CANCELLED', async () => {
    const { session } = await runTurn();
    const closing = connect(server.address, { token: TOKEN, callTimeoutMs: 10_000 });
    const following = closing.watchEvents(session.sessionId, { timeoutMs: STREAM_TIMEOUT_MS });
    assert.equal((await following.next()).value.sequence, 1n);
    closing.close();
    // Before, grpc-js left it running: without its deadline, for ever, keeping the process alive.
    await assert.rejects(collect(following), (err) => err.code === grpc.status.CANCELLED);
  });

  test('a history past 4 MiB is read by a client left at gRPC\'s default receive limit', async () => {
    // Pages stop before 3 MiB: a client that never raised grpc-js's 4 MiB default still reads it.
    const script = path.join(tmp, 'script-long-history.json');
    fs.writeFileSync(script, JSON.stringify({ responses: Array.from({ length: 5 }, () => ({ text: 'Noted.' })) }));
    const session = await client.createSession({ workspace, config: { model: `scripted:${script}` } });
    const prompt = 'p'.repeat(1_000_000);
    for (let i = 0; i < 5; i++) {
      await collect(client.sendMessage(session.sessionId, `${i}${prompt}`, { timeoutMs: STREAM_TIMEOUT_MS }));
    }
    const defaults = connect(server.address, {
      token: TOKEN, channelOptions: { 'grpc.max_receive_message_length': 4 * 1024 * 1024 },
    });
    try {
      const messages = await defaults.getMessages(session.sessionId);
      assert.equal(messages.length, 10);
      assert.deepEqual(messages.filter((m) => m.role === 'MESSAGE_ROLE_USER').map((m) => m.text[0]),
        ['0', '1', '2', '3', '4']);
    } finally {
      defaults.close();
    }
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
    const bytes = WatchEvents.responseSerialize({
      events: { events: [{ sessionId: 's', sequence: MAX.toString(), turnStarted: {} }] },
    });
    const decoded = client._codec.decode('codelane.v1.WatchEventsResponse', WatchEvents.responseDeserialize(bytes));
    assert.equal(decoded.item, 'events');
    const [event] = decoded.events.events;
    assert.equal(event.sequence, MAX);
    assert.equal(event.kind, 'turn_started');
  });

  test('decoding: an event of a kind this client does not know has kind unknown', () => {
    // A newer server's kind is a field this proto lacks: proto-loader drops it, so no payload is
    // set. Its kind was undefined, which code switching on kind never matched.
    const { WatchEvents } = methods();
    const bytes = WatchEvents.responseSerialize({ events: { events: [{ sessionId: 's', sequence: '7' }] } });
    const decoded = client._codec.decode('codelane.v1.WatchEventsResponse', WatchEvents.responseDeserialize(bytes));
    const [event] = decoded.events.events;
    assert.equal(event.sequence, 7n);
    assert.equal(event.kind, 'unknown');
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

  test('listWorkers fetches every page, each with the token of the page before', async () => {
    // A server pages past 1000 workers or 3 MiB: a stand-in for its answers, as a real pool that
    // big is out of reach here (tests/pool/test_list_workers.py pages a real one).
    const pages = {
      '': { workers: [{ workerId: 'a' }], nextPageToken: 'after-a' },
      'after-a': { workers: [{ workerId: 'b' }, { workerId: 'c' }], nextPageToken: '' },
    };
    const asked = [];
    const paged = connect(server.address, { token: TOKEN });
    paged._unary = async (stub, method, requestType, request) => {
      asked.push([method, request.pageToken]);
      return pages[request.pageToken];
    };
    try {
      assert.deepEqual((await paged.listWorkers()).map((w) => w.workerId), ['a', 'b', 'c']);
      assert.deepEqual(asked, [['ListWorkers', ''], ['ListWorkers', 'after-a']]);
    } finally {
      paged.close();
    }
  });

  test('listTools lists the tools a session is offered, with their specs and where each runs', async () => {
    const session = await client.createSession({ workspace });
    const tools = await client.listTools(session.sessionId);
    const names = tools.map((tool) => tool.spec.name);
    assert.deepEqual(names, [...names].sort());
    const read = tools.find((tool) => tool.spec.name === 'read');
    assert.equal(read.spec.lane, 'LANE_QUERY');
    assert.deepEqual(JSON.parse(read.spec.parametersJsonSchema).required, ['file_path']);
    assert.equal(read.laneMode, 'LANE_MODE_INTERNAL');
    assert.ok(['TOOL_RUNNER_WORKERS', 'TOOL_RUNNER_SERVER'].includes(read.runner)); // the local worker may be starting
    const write = tools.find((tool) => tool.spec.name === 'write');
    assert.equal(write.runner, 'TOOL_RUNNER_SERVER');
    assert.equal(write.serverFallback, false);
    await assert.rejects(client.listTools('no-such-session'), (err) => err.code === grpc.status.NOT_FOUND);
  });

  test('getServerInfo gives the server version and start time; serverFromEnv reads $CODELANE_SERVER', async () => {
    const info = await client.getServerInfo();
    const pyproject = fs.readFileSync(fileURLToPath(new URL('../../../pyproject.toml', import.meta.url)), 'utf8');
    assert.equal(info.version, pyproject.match(/^version = "(.+)"$/m)[1]);
    assert.ok(info.startTime instanceof Date && info.startTime <= new Date());

    assert.equal(serverFromEnv({}), DEFAULT_ADDRESS);
    assert.equal(serverFromEnv({ CODELANE_SERVER: 'a:1', CODELANE_ADDRESS: 'b:2' }), 'a:1');
    assert.equal(serverFromEnv({ CODELANE_ADDRESS: 'b:2' }), 'b:2'); // the old name, with a warning
  });
});

// The kind's payload: ev.toolCallFinished for kind 'tool_call_finished'.
function payload(ev) {
  return ev[ev.kind.replace(/_([a-z])/g, (_, c) => c.toUpperCase())];
}

describe('permissions and confirmations', { timeout: TEST_TIMEOUT_MS }, () => {
  // Streams one turn of a session whose policy asks for `write`, answering the confirmation with
  // `approve`; returns the session and the turn's events.
  async function confirmedTurn(model, approve, reason) {
    const session = await client.createSession({
      workspace, model, permissions: { ask: ['write'], default: 'allow', confirmationTimeout: 10 },
    });
    const events = [];
    for await (const ev of client.sendMessage(session.sessionId, 'Write the file.', { timeoutMs: STREAM_TIMEOUT_MS })) {
      events.push(ev);
      if (ev.kind === 'confirmation_required') {
        const { call, deadline } = ev.confirmationRequired;
        assert.equal(call.toolName, 'write');
        assert.equal(call.lane, 'LANE_EXECUTE');
        assert.ok(deadline instanceof Date && deadline > new Date(), 'deadline is a future Date');
        await client.confirmToolCall(session.sessionId, call.callId, approve, { reason });
      }
    }
    return { session, events };
  }

  test('createSession takes the policy in a plain shape; the Session echoes it', async () => {
    const session = await client.createSession({
      workspace, model: scriptModels.approve,
      permissions: { allow: ['read'], deny: ['bash(rm *)'], ask: ['write'], default: 'ask', confirmationTimeout: 5,
        timeoutAction: 'PERMISSION_ACTION_DENY' },
    });
    const policy = session.config.permissions;
    assert.deepEqual([policy.allow, policy.deny, policy.ask], [['read'], ['bash(rm *)'], ['write']]);
    assert.equal(policy.defaultAction, 'PERMISSION_ACTION_ASK');
    assert.equal(policy.timeoutAction, 'PERMISSION_ACTION_DENY');
    assert.equal(policy.confirmationTimeout, 5);
    await client.deleteSession(session.sessionId);

    await assert.rejects(client.createSession({ workspace, permissions: { ask: 'write' } }), TypeError);
    await assert.rejects(client.createSession({ workspace, permissions: { default: 'maybe' } }), TypeError);
    await assert.rejects(client.createSession({ workspace, permissions: { asks: ['write'] } }), TypeError);
  });

  test('createSession takes a sandbox policy and env in a plain shape; the Session echoes them', async () => {
    const session = await client.createSession({
      workspace, model: scriptModels.approve,
      sandbox: { mode: 'read-only', maxProcesses: 64, maxMemoryBytes: 256 * 1024 * 1024, maxCpuTime: 30 },
      env: { PROJECT_MODE: 'ci' },
    });
    const { sandbox } = session.config;
    assert.equal(sandbox.mode, 'SANDBOX_MODE_READ_ONLY');
    assert.equal(sandbox.network, 'SANDBOX_NETWORK_OFF');
    assert.equal(sandbox.limits.maxProcesses, 64);
    assert.equal(sandbox.limits.maxMemoryBytes, BigInt(256 * 1024 * 1024));
    assert.equal(sandbox.limits.maxCpuTime, 30);
    assert.deepEqual(session.config.env, { PROJECT_MODE: 'ci' });
    await client.deleteSession(session.sessionId);

    await assert.rejects(client.createSession({ workspace, sandbox: { mode: 'sealed' } }), TypeError);
    await assert.rejects(client.createSession({ workspace, sandbox: { cpu: 3 } }), TypeError);
    // The server refuses what its operator does not allow, naming the field.
    await assert.rejects(client.createSession({ workspace, model: scriptModels.approve, sandbox: { mode: 'off' } }),
      (err) => err.code === grpc.status.INVALID_ARGUMENT && err.errorInfo?.metadata?.field === 'config.sandbox.mode');
  });

  test('an approved write runs: confirmation_required, confirmToolCall(approve), the file is written', async () => {
    const { session, events } = await confirmedTurn(scriptModels.approve, true);
    const required = events.filter((e) => e.kind === 'confirmation_required');
    assert.equal(required.length, 1);
    const { callId } = required[0].confirmationRequired.call;
    const resolved = events.find((e) => e.kind === 'confirmation_resolved');
    assert.equal(resolved.confirmationResolved.callId, callId);
    assert.equal(resolved.confirmationResolved.outcome, 'CONFIRMATION_OUTCOME_APPROVED');
    const finished = events.find((e) => e.kind === 'tool_call_finished');
    assert.equal(finished.toolCallFinished.callId, callId);
    assert.equal(finished.toolCallFinished.result.isError, false, finished.toolCallFinished.result.output);
    assert.ok(required[0].sequence < resolved.sequence && resolved.sequence < finished.sequence);
    assert.equal(events.at(-1).kind, 'turn_finished');
    assert.equal(events.at(-1).turnFinished.stopReason, 'STOP_REASON_END_TURN');
    assert.equal(fs.readFileSync(path.join(workspace, 'approved.txt'), 'utf8'), 'approved\n');

    // Already answered: nothing waits any more.
    await assert.rejects(client.confirmToolCall(session.sessionId, callId, true),
      (err) => err.code === grpc.status.NOT_FOUND);
  });

  test('a rejected write is a PERMISSION_DENIED error result carrying the reason', async () => {
    const { session, events } = await confirmedTurn(scriptModels.reject, false, 'not in this sprint');
    const resolved = events.find((e) => e.kind === 'confirmation_resolved');
    assert.equal(resolved.confirmationResolved.outcome, 'CONFIRMATION_OUTCOME_REJECTED');
    assert.equal(resolved.confirmationResolved.reason, 'not in this sprint');
    const { result } = events.find((e) => e.kind === 'tool_call_finished').toolCallFinished;
    assert.equal(result.isError, true);
    assert.equal(result.errorKind, 'ERROR_KIND_PERMISSION_DENIED');
    assert.match(result.output, /not in this sprint/);
    assert.equal(events.at(-1).turnFinished.stopReason, 'STOP_REASON_END_TURN');
    assert.equal(fs.existsSync(path.join(workspace, 'rejected.txt')), false, 'the rejected write did not run');

    const toolMessage = (await client.getMessages(session.sessionId)).find((m) => m.role === 'MESSAGE_ROLE_TOOL');
    assert.equal(toolMessage.toolResult.errorKind, 'ERROR_KIND_PERMISSION_DENIED');
  });

  test('confirmToolCall for an unknown call (or session) rejects with NOT_FOUND', async () => {
    const session = await client.createSession({ workspace, model: scriptModels.approve, permissions: { ask: ['write'] } });
    await assert.rejects(client.confirmToolCall(session.sessionId, 'call_does_not_exist', true), (err) => {
      assert.equal(err.code, grpc.status.NOT_FOUND);
      assert.equal(err.code, 5);
      assert.equal(err.errorInfo?.reason, 'CONFIRMATION_NOT_FOUND');
      assert.equal(err.errorInfo?.metadata?.call_id, 'call_does_not_exist');
      return true;
    });
    await assert.rejects(client.confirmToolCall('no-such-session', 'call_x', false),
      (err) => err.code === grpc.status.NOT_FOUND);
    await client.deleteSession(session.sessionId);
  });
});

describe('external tasks', { timeout: TEST_TIMEOUT_MS }, () => {
  const CLIENT_ID = 'node-runner';

  test('createSession takes lane modes; a malformed one is a TypeError', async () => {
    const session = await client.createSession({
      workspace, model: scriptModels.external, lanes: { execute: 'external', query: { mode: 'internal', timeout: 30 } },
      externalTaskTimeout: 12.5,
    });
    const { lanes, externalTaskTimeout } = session.config.queue;
    assert.ok(lanes.some((l) => l.lane === 'LANE_EXECUTE' && l.mode === 'LANE_MODE_EXTERNAL'), JSON.stringify(lanes));
    assert.ok(lanes.some((l) => l.lane === 'LANE_QUERY' && l.mode === 'LANE_MODE_INTERNAL' && l.timeout === 30));
    assert.equal(externalTaskTimeout, 12.5);
    await client.deleteSession(session.sessionId);

    await assert.rejects(client.createSession({ workspace, lanes: { execute: 'sideways' } }), TypeError);
    await assert.rejects(client.createSession({ workspace, lanes: { kitchen: 'external' } }), TypeError);
  });

  test('runExternalTasks runs the Execute calls of an EXTERNAL lane; their results reach the model', async () => {
    const session = await client.createSession({
      workspace, model: scriptModels.external, lanes: { execute: 'external' }, externalTaskTimeout: 15,
    });
    const seen = [];
    const handlerErrors = [];
    const controller = new AbortController();
    const runner = client.runExternalTasks(session.sessionId, CLIENT_ID, async (task, { signal }) => {
      seen.push(task);
      assert.ok(signal instanceof AbortSignal);
      if (task.call.toolName === 'write') throw new Error('disk full');
      return { output: `ran ${JSON.parse(task.call.argumentsJson).command} outside`, exitCode: 0 };
    }, { signal: controller.signal, waitSeconds: 10, leaseSeconds: 10, onError: (err) => handlerErrors.push(err) });

    let events;
    try {
      events = await collect(client.sendMessage(session.sessionId, 'Run it elsewhere.', { timeoutMs: STREAM_TIMEOUT_MS }));
    } finally {
      controller.abort();
    }
    const startedAt = Date.now();
    assert.equal(await runner, 2, 'two tasks completed');
    assert.ok(Date.now() - startedAt < 2_000, 'aborting cancels the pending long-poll claim at once');

    // The tasks, as the handler saw them, in the model's order (Execute calls run one at a time).
    assert.deepEqual(seen.map((t) => t.call.toolName), ['bash', 'write']);
    for (const task of seen) {
      assert.match(task.taskId, /\S/);
      assert.equal(task.sessionId, session.sessionId);
      assert.equal(task.lane, 'LANE_EXECUTE');
      assert.equal(task.call.lane, 'LANE_EXECUTE');
      assert.equal(typeof task.call.index, 'number');
      assert.equal(task.attempt, 1); // int32: a Number
      assert.ok(task.leaseExpireTime instanceof Date && task.leaseExpireTime > task.deadline - 15_000);
      assert.ok(task.deadline instanceof Date);
      assert.equal(task.workspace, fs.realpathSync(workspace));
    }
    assert.deepEqual(handlerErrors.map((e) => e.message), ['disk full']);

    // The events: pending, then completed by this client, for each call.
    assert.equal(events.at(-1).kind, 'turn_finished');
    assert.equal(events.at(-1).turnFinished.stopReason, 'STOP_REASON_END_TURN');
    const pending = events.filter((e) => e.kind === 'external_task_pending');
    const completed = events.filter((e) => e.kind === 'external_task_completed');
    assert.deepEqual(pending.map((e) => e.externalTaskPending.task.taskId), seen.map((t) => t.taskId));
    assert.deepEqual(completed.map((e) => e.externalTaskCompleted.taskId), seen.map((t) => t.taskId));
    assert.ok(completed.every((e) => e.externalTaskCompleted.clientId === CLIENT_ID));
    for (const ev of events) assert.ok(payload(ev), `payload of ${ev.kind}`);

    // The history: the handler's output as the bash result, the exception as the write's error.
    const messages = await client.getMessages(session.sessionId);
    const tools = messages.filter((m) => m.role === 'MESSAGE_ROLE_TOOL');
    assert.equal(tools.length, 2);
    assert.equal(tools[0].toolCallId, seen[0].call.callId);
    assert.equal(tools[0].toolResult.output, 'ran echo from-the-server outside');
    assert.equal(tools[0].toolResult.isError, false);
    assert.equal(tools[0].toolResult.exitCode, 0);
    assert.equal(tools[0].toolResult.workerId, CLIENT_ID);
    assert.equal(tools[1].toolCallId, seen[1].call.callId);
    assert.equal(tools[1].toolResult.isError, true);
    assert.equal(tools[1].toolResult.errorKind, 'ERROR_KIND_TOOL_ERROR');
    assert.match(tools[1].toolResult.output, /disk full/);
    assert.equal(messages.at(-1).text, 'Done.');
    assert.equal(fs.existsSync(path.join(workspace, 'external.txt')), false, 'the server did not run the write');
  });

  test('runExternalTasks renews the lease of a handler that outlasts it; renewing by hand', async () => {
    const session = await client.createSession({
      workspace, model: scriptModels.lease, lanes: { execute: 'external' }, externalTaskTimeout: 15,
    });
    const attempts = [];
    const errors = [];
    const controller = new AbortController();
    const runner = client.runExternalTasks(session.sessionId, CLIENT_ID, async (task) => {
      attempts.push(task.attempt);
      // By hand: the holder may renew; another client may not.
      const renewed = await client.renewExternalTaskLease(session.sessionId, task.taskId, CLIENT_ID,
        { leaseSeconds: 0.2 });
      assert.equal(renewed.taskId, task.taskId);
      assert.ok(renewed.leaseExpireTime instanceof Date && renewed.leaseExpireTime - Date.now() <= 200);
      await assert.rejects(
        client.renewExternalTaskLease(session.sessionId, task.taskId, 'someone-else', { leaseSeconds: 5 }),
        (err) => err.code === grpc.status.FAILED_PRECONDITION && err.errorInfo?.reason === 'LEASE_NOT_HELD');
      await new Promise((resolve) => { setTimeout(resolve, 1000); }); // five leases long
      return 'slow but done';
    }, { signal: controller.signal, waitSeconds: 10, leaseSeconds: 0.2, onError: (err) => errors.push(err) });

    let events;
    try {
      events = await collect(client.sendMessage(session.sessionId, 'Write it.', { timeoutMs: STREAM_TIMEOUT_MS }));
    } finally {
      controller.abort();
    }
    assert.equal(await runner, 1);
    assert.deepEqual(attempts, [1], 'never offered again: the lease was renewed while the handler ran');
    assert.deepEqual(errors, []);
    assert.equal(events.filter((e) => e.kind === 'external_task_pending').length, 1);
    const finished = events.find((e) => e.kind === 'tool_call_finished');
    assert.equal(finished?.toolCallFinished.result.output, 'slow but done');
    await assert.rejects(
      client.renewExternalTaskLease(session.sessionId, 'task_unknown', CLIENT_ID, { leaseSeconds: 5 }),
      (err) => err.code === grpc.status.NOT_FOUND);
  });

  test('runExternalTasks aborts the handler of a task that is gone and claims the next', async () => {
    // A handler stuck on a task that had timed out held the loop's one slot: the next task
    // timed out unclaimed too.
    const session = await client.createSession({
      workspace, model: scriptModels.gone, lanes: { execute: 'external' }, externalTaskTimeout: 1,
    });
    const controller = new AbortController();
    let stuckAborted = false;
    const runner = client.runExternalTasks(session.sessionId, CLIENT_ID, async (task, { signal }) => {
      const { command } = JSON.parse(task.call.argumentsJson);
      if (command === 'next') return 'next ran';
      await new Promise((resolve) => { signal.addEventListener('abort', resolve, { once: true }); });
      stuckAborted = true;
      return 'too late';
    }, { signal: controller.signal, waitSeconds: 10, leaseSeconds: 0.5 });

    let events;
    try {
      events = await collect(client.sendMessage(session.sessionId, 'Go.', { timeoutMs: STREAM_TIMEOUT_MS }));
    } finally {
      controller.abort();
    }
    assert.equal(await runner, 1);
    assert.ok(stuckAborted, "the stuck handler's signal was aborted once its task was gone");
    assert.equal(events.at(-1).turnFinished.stopReason, 'STOP_REASON_END_TURN');
    const results = events.filter((e) => e.kind === 'tool_call_finished').map((e) => e.toolCallFinished.result);
    assert.deepEqual(results.map((r) => [r.errorKind, r.output]).slice(1), [['ERROR_KIND_UNSPECIFIED', 'next ran']]);
    assert.equal(results[0].errorKind, 'ERROR_KIND_TIMEOUT');
  });

  test('claim and complete by hand: only the lease holder may complete, once', async () => {
    const session = await client.createSession({
      workspace, model: scriptModels.lease, lanes: { execute: 'external' }, externalTaskTimeout: 15,
    });
    // Nothing pending yet: an immediate claim returns no task.
    assert.deepEqual(await client.claimExternalTasks(session.sessionId, { clientId: 'a' }), []);

    const turn = collect(client.sendMessage(session.sessionId, 'Write it.', { timeoutMs: STREAM_TIMEOUT_MS }));
    try {
      const tasks = await client.claimExternalTasks(session.sessionId,
        { clientId: 'a', maxTasks: 5, leaseSeconds: 10, waitSeconds: 5 });
      assert.equal(tasks.length, 1);
      const [task] = tasks;
      assert.equal(task.call.toolName, 'write');
      assert.deepEqual(JSON.parse(task.call.argumentsJson), { file_path: 'leased.txt', content: 'x' });

      await assert.rejects(
        client.completeExternalTask(session.sessionId, task.taskId, 'b', { output: 'not mine' }),
        (err) => {
          assert.equal(err.code, grpc.status.FAILED_PRECONDITION);
          assert.equal(err.code, 9);
          assert.equal(err.errorInfo?.reason, 'LEASE_NOT_HELD');
          return true;
        },
      );
      await assert.rejects(client.completeExternalTask(session.sessionId, 'task_unknown', 'a', { output: '' }),
        (err) => err.code === grpc.status.NOT_FOUND);
      await assert.rejects(client.completeExternalTask(session.sessionId, task.taskId, 'a', { errorKind: 'oops' }),
        TypeError);

      await client.completeExternalTask(session.sessionId, task.taskId, 'a',
        { output: 'written by hand', metadataJson: '{"bytes": 1}', errorKind: '' });
      // Done once: the task is gone.
      await assert.rejects(client.completeExternalTask(session.sessionId, task.taskId, 'a', { output: 'again' }),
        (err) => err.code === grpc.status.NOT_FOUND);
    } finally {
      const events = await turn;
      const finished = events.find((e) => e.kind === 'tool_call_finished');
      assert.equal(finished?.toolCallFinished.result.output, 'written by hand');
      assert.equal(events.at(-1).kind, 'turn_finished');
    }
    // An empty client id is refused by the server.
    await assert.rejects(client.claimExternalTasks(session.sessionId, { clientId: '' }),
      (err) => err.code === grpc.status.INVALID_ARGUMENT && err.errorInfo?.metadata?.field === 'client_id');
  });
});

// A server whose event streams may fall one event behind before it cuts them (RESOURCE_EXHAUSTED),
// and a turn of many calls: its events come in bursts, so the cut really happens, every time.
describe('streams that break are resumed', { timeout: TEST_TIMEOUT_MS }, () => {
  const CALLS = 40;
  let tiny;
  let tinyClient;

  before(async () => {
    const script = path.join(tmp, 'script-many.json');
    const step = {
      text: 'Reading everything at once, in many small words so that the text streams.',
      tool_calls: Array.from({ length: CALLS }, (_, i) => ({ id: `c_${i}`, name: 'read', arguments: { file_path: 'README.md' } })),
    };
    fs.writeFileSync(script, JSON.stringify({ responses: [step, { text: 'Done.' }] }));
    tiny = startServer(path.join(tmp, 'data-tiny'), script,
      ['--local-workers', '0', '--subscriber-buffer', '1']);
    await tiny.ready;
    tinyClient = connect(tiny.address, { token: TOKEN, callTimeoutMs: 10_000 });
  }, { timeout: SERVER_START_MS + 5_000 });

  after(async () => {
    tinyClient?.close();
    await stopServer(tiny?.child);
  });

  // The server catches a lagging stream up from its store instead of cutting it; the dropped
  // connection below is what proves that a broken stream is resumed.
  test('sendMessage through a one-event buffer: no event missed or repeated', async () => {
    const session = await tinyClient.createSession({ workspace });
    const events = await collect(tinyClient.sendMessage(session.sessionId, 'go', { timeoutMs: STREAM_TIMEOUT_MS }));
    assertGapFree(events, 1n);
    assert.equal(events.at(-1).kind, 'turn_finished');
    assert.equal(events.at(-1).turnFinished.stopReason, 'STOP_REASON_END_TURN');
    assert.equal(events.filter((e) => e.kind === 'tool_call_finished').length, CALLS);
    const stored = await collect(tinyClient.watchEvents(session.sessionId,
      { follow: false, timeoutMs: STREAM_TIMEOUT_MS }));
    assert.deepEqual(stored.slice(0, -1), events);
  });

  test('a following watchEvents through a one-event buffer marks caught_up once', async () => {
    const session = await tinyClient.createSession({ workspace });
    const watch = tinyClient.watchEvents(session.sessionId, { follow: true, timeoutMs: STREAM_TIMEOUT_MS });
    const first = await watch.next();
    assert.deepEqual(first.value, { kind: 'caught_up', lastSequence: 0n });
    const sent = await collect(tinyClient.sendMessage(session.sessionId, 'go', { timeoutMs: STREAM_TIMEOUT_MS }));
    const watched = [];
    for await (const item of watch) {
      watched.push(item);
      if (item.kind === 'turn_finished') break;
    }
    assert.deepEqual(watched, sent);
  });

  test('sendMessage resumes when its connection drops mid-turn', async () => {
    // The bash call waits for a file this test creates once it has dropped the connection, so
    // the stream breaks while the turn runs, with events still to come.
    const script = path.join(tmp, 'script-waiting.json');
    fs.writeFileSync(script, JSON.stringify({
      responses: [
        {
          text: 'Reading, then waiting.',
          tool_calls: [
            { id: 'c_read', name: 'read', arguments: { file_path: 'README.md' } },
            { id: 'c_wait', name: 'bash', arguments: { command: 'while [ ! -e go-node ]; do sleep 0.05; done; echo went' } },
          ],
        },
        { text: 'Done.' },
      ],
    }));
    const proxy = await droppingProxy(Number(tiny.address.split(':')[1]));
    const viaProxy = connect(`${HOST}:${proxy.port}`, { token: TOKEN, callTimeoutMs: 10_000 });
    try {
      const session = await viaProxy.createSession({ workspace, model: `scripted:${script}` });
      const resumes = [];
      const events = [];
      for await (const ev of viaProxy.sendMessage(session.sessionId, 'go', {
        timeoutMs: STREAM_TIMEOUT_MS, onResume: (err) => resumes.push(err.code),
      })) {
        events.push(ev);
        if (ev.kind === 'tool_call_started' && ev.toolCallStarted.call.callId === 'c_wait') {
          proxy.drop();
          fs.writeFileSync(path.join(workspace, 'go-node'), '');
        }
      }
      assertGapFree(events, 1n);
      assert.equal(events.at(-1).turnFinished?.stopReason, 'STOP_REASON_END_TURN');
      const waited = events.find((e) => e.kind === 'tool_call_finished' && e.toolCallFinished.callId === 'c_wait');
      assert.equal(waited.toolCallFinished.result.output.trim(), 'went');
      assert.ok(proxy.dropped >= 1);
      assert.ok(resumes.includes(grpc.status.UNAVAILABLE), `resumes: ${resumes}`);
    } finally {
      viaProxy.close();
      await proxy.close();
      fs.rmSync(path.join(workspace, 'go-node'), { force: true });
    }
  });

  // The resume budget counts from the break, not from the last event. Its clock is moved on by
  // the tests (a quiet spell is `skip(ms)`), and stands still while a broken stream is resumed:
  // no test waits, or depends on how fast anything is.
  const realTiming = { ..._resumeTiming };
  let skippedMs = 0;
  const skip = (ms) => {
    skippedMs += ms;
  };
  const manualClock = () => {
    _resumeTiming.now = () => realTiming.now() + skippedMs;
  };
  afterEach(() => {
    Object.assign(_resumeTiming, realTiming);
    skippedMs = 0;
  });

  test('sendMessage resumes a break that follows a quiet spell', async () => {
    manualClock();
    const script = path.join(tmp, 'script-quiet.json');
    fs.writeFileSync(script, JSON.stringify({
      responses: [
        {
          text: 'Waiting.',
          tool_calls: [
            { id: 'c_wait', name: 'bash', arguments: { command: 'while [ ! -e go-quiet ]; do sleep 0.05; done; echo went' } },
          ],
        },
        { text: 'Done.' },
      ],
    }));
    const proxy = await droppingProxy(Number(tiny.address.split(':')[1]));
    const viaProxy = connect(`${HOST}:${proxy.port}`, { token: TOKEN, callTimeoutMs: 10_000 });
    try {
      const session = await viaProxy.createSession({ workspace, model: `scripted:${script}` });
      const events = [];
      for await (const ev of viaProxy.sendMessage(session.sessionId, 'go', { timeoutMs: STREAM_TIMEOUT_MS })) {
        events.push(ev);
        if (ev.kind === 'tool_call_started') {
          skip(10 * _resumeTiming.withinMs); // a long call: no event for a long time
          proxy.drop(); // then the connection drops
          fs.writeFileSync(path.join(workspace, 'go-quiet'), '');
        }
      }
      assertGapFree(events, 1n);
      assert.equal(events.at(-1).turnFinished?.stopReason, 'STOP_REASON_END_TURN');
      assert.ok(proxy.dropped >= 1);
    } finally {
      viaProxy.close();
      await proxy.close();
      fs.rmSync(path.join(workspace, 'go-quiet'), { force: true });
    }
  });

  test('watchEvents of an idle session resumes a break', async () => {
    manualClock();
    const proxy = await droppingProxy(Number(tiny.address.split(':')[1]));
    const viaProxy = connect(`${HOST}:${proxy.port}`, { token: TOKEN, callTimeoutMs: 10_000 });
    try {
      const session = await viaProxy.createSession({ workspace });
      const watched = [];
      let sent;
      for await (const item of viaProxy.watchEvents(session.sessionId, { timeoutMs: STREAM_TIMEOUT_MS })) {
        watched.push(item);
        if (item.kind === 'caught_up') {
          skip(10 * _resumeTiming.withinMs); // nothing happens for a long time
          proxy.drop(); // then the connection drops (as when the server restarts)
          sent = await collect(tinyClient.sendMessage(session.sessionId, 'go', { timeoutMs: STREAM_TIMEOUT_MS }));
        } else if (item.kind === 'turn_finished') {
          break;
        }
      }
      assert.deepEqual(watched, [{ kind: 'caught_up', lastSequence: 0n }, ...sent]);
      assert.ok(proxy.dropped >= 1);
    } finally {
      viaProxy.close();
      await proxy.close();
    }
  });

  const caughtUp = { caughtUp: { lastSequence: '0' } };
  const event = (sequence) => ({
    events: { events: [{ sessionId: 's_scripted', sequence: String(sequence), turnId: 't_1', turnStarted: { userText: 'go' } }] },
  });

  test('a caught_up marker starts the resume budget afresh', async () => {
    // An idle session: each stream only says it is caught up, then breaks after a long quiet
    // spell. Each break is a new one (the stream had worked again), each resumed.
    manualClock();
    Object.assign(_resumeTiming, { backoffInitialMs: 0, backoffMaxMs: 0 });
    const quiet = () => skip(10 * _resumeTiming.withinMs);
    const scripted = await scriptedWatches([
      { replies: [caughtUp], then: quiet }, { replies: [caughtUp], then: quiet }, { replies: [event(1)] },
    ]);
    const viaScripted = connect(scripted.address, { callTimeoutMs: 10_000 });
    try {
      const items = [];
      for await (const item of viaScripted.watchEvents('s_scripted', { timeoutMs: STREAM_TIMEOUT_MS })) {
        items.push(item);
        if (items.length === 2) break;
      }
      assert.deepEqual(items.map((item) => [item.kind, item.sequence]), [['caught_up', undefined], ['turn_started', 1n]]);
      assert.deepEqual(scripted.requests.map((r) => r.afterSequence), ['0', '0', '0']);
    } finally {
      viaScripted.close();
      scripted.close();
    }
  });

  test('resumes that fail spend the budget counted from the break', async () => {
    // The stream breaks right after an event; every resume fails, each a while later: once the
    // budget is spent since the break, the error is thrown.
    manualClock();
    Object.assign(_resumeTiming, { backoffInitialMs: 0, backoffMaxMs: 0 });
    const later = () => skip(0.6 * _resumeTiming.withinMs);
    const scripted = await scriptedWatches([
      { replies: [event(1)] }, { then: later }, { then: later }, { then: later },
    ]);
    const viaScripted = connect(scripted.address, { callTimeoutMs: 10_000 });
    try {
      const seen = [];
      await assert.rejects(async () => {
        for await (const item of viaScripted.watchEvents('s_scripted', { timeoutMs: STREAM_TIMEOUT_MS })) seen.push(item);
      }, (err) => err.code === grpc.status.UNAVAILABLE);
      assert.deepEqual(seen.map((item) => item.sequence), [1n]);
      // Two resumes; the second broke past the budget.
      assert.deepEqual(scripted.requests.map((r) => r.afterSequence), ['0', '1', '1']);
    } finally {
      viaScripted.close();
      scripted.close();
    }
  });

  test('a resume cancelled by a stopping server is resumed again', async () => {
    // A server stopping (SIGTERM) ends its following streams with UNAVAILABLE SHUTTING_DOWN; a
    // resume made at once reached it while its gRPC server stopped, which cancels the calls it
    // has not started (CANCELLED from the server), and that error was thrown, where the
    // restarted server was there to resume on.
    Object.assign(_resumeTiming, { backoffInitialMs: 0, backoffMaxMs: 0 });
    const scripted = await scriptedWatches([
      { replies: [event(1)] }, { code: grpc.status.CANCELLED }, { replies: [caughtUp, event(2)] },
    ]);
    const viaScripted = connect(scripted.address, { callTimeoutMs: 10_000 });
    try {
      const items = [];
      for await (const item of viaScripted.watchEvents('s_scripted', { timeoutMs: STREAM_TIMEOUT_MS })) {
        items.push(item);
        if (items.length === 3) break;
      }
      assert.deepEqual(items.map((item) => item.sequence), [1n, undefined, 2n]);
      assert.deepEqual(scripted.requests.map((r) => r.afterSequence), ['0', '1', '1']);
    } finally {
      viaScripted.close();
      scripted.close();
    }
  });

  test('a resumed stream that never answers is given up once the budget is spent', async () => {
    // grpc-js waits for ever on a server that takes the connection and says nothing (one
    // stopped, or hung): the iteration waited with it, past any budget.
    Object.assign(_resumeTiming, { withinMs: 300, backoffInitialMs: 0, backoffMaxMs: 0 });
    const scripted = await scriptedWatches([{ replies: [event(1)] }, { silent: true }]);
    const viaScripted = connect(scripted.address, { callTimeoutMs: 10_000 });
    try {
      const seen = [];
      await assert.rejects(async () => {
        for await (const item of viaScripted.watchEvents('s_scripted')) seen.push(item);
      }, (err) => err.code === grpc.status.UNAVAILABLE && /no reply from the server/.test(err.details)
        // why it broke first is not hidden by the silence after it
        && err.details.endsWith('since the event stream broke (UNAVAILABLE: scripted break)'));
      assert.deepEqual(seen.map((item) => item.sequence), [1n]);
      assert.deepEqual(scripted.requests.map((r) => r.afterSequence), ['0', '1']);
    } finally {
      viaScripted.close();
      scripted.close();
    }
  });
});

// A server back after a long outage: the test waits for the client's connection attempts, which
// gRPC spaces out, so it takes longer than the others.
describe('a server back late is reached', { timeout: 40_000 }, () => {
  test('sendMessage resumes from a server back late in the resume budget', async () => {
    // gRPC spaces a channel's connection attempts 1 s, 1.6 s, 2.6 s ... 10.5 s apart (up to 2 min):
    // after seven refused (16-19 s), its next came past the resume budget, so a server
    // back meanwhile was never reached and the iteration threw a stale connection error.
    const script = path.join(tmp, 'script-back-late.json');
    fs.writeFileSync(script, JSON.stringify({
      responses: [
        {
          text: 'Waiting.',
          tool_calls: [
            { id: 'c_wait', name: 'bash', arguments: { command: 'while [ ! -e go-late ]; do sleep 0.05; done; echo went' } },
          ],
        },
        { text: 'Done.' },
      ],
    }));
    const proxy = await droppingProxy(Number(server.address.split(':')[1]));
    const viaProxy = connect(`${HOST}:${proxy.port}`, { token: TOKEN, callTimeoutMs: 10_000 });
    try {
      const session = await viaProxy.createSession({ workspace, model: `scripted:${script}` });
      const events = [];
      let outage;
      for await (const ev of viaProxy.sendMessage(session.sessionId, 'go', { timeoutMs: 35_000 })) {
        events.push(ev);
        if (ev.kind === 'tool_call_started') {
          outage = proxy.refuse(7).then(() => fs.writeFileSync(path.join(workspace, 'go-late'), ''));
        }
      }
      await outage;
      assertGapFree(events, 1n);
      assert.equal(events.at(-1).turnFinished?.stopReason, 'STOP_REASON_END_TURN');
    } finally {
      viaProxy.close();
      await proxy.close();
      fs.rmSync(path.join(workspace, 'go-late'), { force: true });
    }
  });
});

describe('a connection that goes silent', { timeout: TEST_TIMEOUT_MS }, () => {
  test('a stream over it breaks once a keepalive ping goes unanswered, and is resumed', async () => {
    // grpc-js sends no keepalive pings unless told: a stream over a connection whose peer went
    // silent, still open, waited for ever. The pings are 30 s apart; this test makes them quick.
    const realKeepalive = { ...clientModule._keepalive };
    Object.assign(clientModule._keepalive, { timeMs: 1_000, timeoutMs: 1_000 });
    const proxy = await droppingProxy(Number(server.address.split(':')[1]));
    const viaProxy = connect(`${HOST}:${proxy.port}`, { token: TOKEN, callTimeoutMs: 10_000 });
    Object.assign(clientModule._keepalive, realKeepalive);
    try {
      const session = await viaProxy.createSession({ workspace });
      const resumes = [];
      const watched = [];
      let sent;
      const onResume = (err) => {
        resumes.push(err.code);
        sent ??= collect(client.sendMessage(session.sessionId, 'go', { timeoutMs: STREAM_TIMEOUT_MS }));
      };
      for await (const item of viaProxy.watchEvents(session.sessionId, { onResume })) {
        watched.push(item);
        if (item.kind === 'caught_up') proxy.stall();
        else if (item.kind === 'turn_finished') break;
      }
      assert.equal(resumes[0], grpc.status.UNAVAILABLE);
      assert.deepEqual(watched, [{ kind: 'caught_up', lastSequence: 0n }, ...await sent]);
    } finally {
      viaProxy.close();
      await proxy.close();
    }
  });
});

describe('close() and the calls still running', { timeout: TEST_TIMEOUT_MS }, () => {
  test('a stream resumed after close(), and a call made after it, end with CANCELLED', async () => {
    // They threw grpc-js's bare Error('Channel has been shut down'), with no status code.
    const closing = connect(`${HOST}:${await freePort()}`, { callTimeoutMs: 10_000 }); // nothing listens
    const watch = closing.watchEvents('s_1', { onResume: () => closing.close() });
    await assert.rejects(collect(watch), (err) => err.code === grpc.status.CANCELLED);
    await assert.rejects(closing.getSession('s_1'), (err) => err.code === grpc.status.CANCELLED);
    assert.throws(() => closing.watchEvents('s_1'), (err) => err.code === grpc.status.CANCELLED);
  });

  test('a unary call still running (a long-polling claim) ends with CANCELLED', async () => {
    // grpc-js lets the calls of a closed channel run on: a claim went on waiting its whole
    // waitSeconds (up to 60 s), keeping the process alive, and resolved as if nothing happened.
    const service = protoLoader.loadSync(['codelane/v1/session.proto'], {
      includeDirs: [PROTOS_DIR], longs: String, enums: String, defaults: true, oneofs: true,
    })['codelane.v1.SessionService'];
    let claimed;
    const arrived = new Promise((resolve) => { claimed = resolve; });
    const silent = new grpc.Server();
    silent.addService(service, { ClaimExternalTasks: () => claimed() }); // never answers
    const port = await new Promise((resolve, reject) => {
      silent.bindAsync(`${HOST}:0`, grpc.ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
    });
    const closing = connect(`${HOST}:${port}`, { callTimeoutMs: 60_000 });
    try {
      const claim = closing.claimExternalTasks('s_1', { clientId: 'closing', waitSeconds: 60 });
      await arrived;
      closing.close();
      await assert.rejects(claim, (err) => err.code === grpc.status.CANCELLED);
    } finally {
      closing.close();
      silent.forceShutdown();
    }
  });
});

/**
 * A SessionService in this process whose WatchEvents plays `streams` in turn: each writes its
 * `replies` (WatchEventsResponse objects), runs its `then()` (where a test moves the clock on),
 * then ends with its `code` (UNAVAILABLE, as a lost connection does); a `silent` one says nothing
 * and never ends.
 * `requests` are the WatchEventsRequests seen.
 */
async function scriptedWatches(streams) {
  const service = protoLoader.loadSync(['codelane/v1/session.proto'], {
    includeDirs: [PROTOS_DIR], longs: String, enums: String, defaults: true, oneofs: true,
  })['codelane.v1.SessionService'];
  const requests = [];
  const server = new grpc.Server();
  server.addService(service, {
    WatchEvents(call) {
      requests.push(call.request);
      const { replies = [], then, silent, code = grpc.status.UNAVAILABLE } = streams[requests.length - 1] ?? {};
      if (silent) return; // says nothing, and never ends
      for (const reply of replies) call.write(reply);
      then?.();
      call.emit('error', { code, details: 'scripted break' });
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync(`${HOST}:0`, grpc.ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
  });
  return { address: `${HOST}:${port}`, requests, close: () => server.forceShutdown() };
}

/**
 * A TCP proxy to 127.0.0.1:targetPort whose drop() closes every connection open through it, and
 * whose refuse(n) does too, then closes each new connection at once (a server down) until n were.
 * stall() makes the connections open through it go silent, still open; new ones pass.
 */
function droppingProxy(targetPort) {
  const open = new Set();
  let dropped = 0;
  let refusing = null; // {left, done} while refusing
  const pairs = new Set(); // [client, upstream] of each open connection
  const server = net.createServer((client) => {
    if (refusing) {
      client.destroy();
      if (--refusing.left === 0) {
        refusing.done();
        refusing = null;
      }
      return;
    }
    const upstream = net.connect(targetPort, HOST);
    open.add(client);
    open.add(upstream);
    client.pipe(upstream);
    upstream.pipe(client);
    const pair = [client, upstream];
    pairs.add(pair);
    for (const socket of [client, upstream]) {
      socket.on('error', () => {}); // a dropped peer
      socket.on('close', () => {
        client.destroy();
        upstream.destroy();
        open.delete(client);
        open.delete(upstream);
        pairs.delete(pair);
      });
    }
  });
  return new Promise((resolve) => server.listen(0, HOST, () => resolve({
    port: server.address().port,
    get dropped() {
      return dropped;
    },
    drop() {
      dropped += open.size / 2;
      for (const socket of open) socket.destroy();
      open.clear();
    },
    stall() {
      // The connections open stay open but carry nothing more, either way: their peer is silent.
      for (const [client, upstream] of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
    },
    refuse(n) {
      this.drop();
      return new Promise((done) => {
        refusing = { left: n, done };
      });
    },
    close() {
      this.drop();
      return new Promise((done) => server.close(done));
    },
  })));
}
