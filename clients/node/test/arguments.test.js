// Arguments the client refuses before any call, with a TypeError saying what is wrong: unknown
// options of every method (and of the objects they take), bad values, and server addresses
// without a port (in connect and in the examples' flags). No codelane server is needed: the
// client points at a listener that only counts connections, and no test may open one.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import { connect, parseAddress } from '../src/client.js';

const HOST = '127.0.0.1';
const TEST_TIMEOUT_MS = 20_000;

let listener; // { address, connections, close() }
let client;

before(async () => {
  let connections = 0;
  const server = net.createServer((socket) => {
    connections += 1;
    socket.destroy();
  });
  await new Promise((resolve) => server.listen(0, HOST, resolve));
  listener = {
    address: `${HOST}:${server.address().port}`,
    get connections() {
      return connections;
    },
    close: () => new Promise((resolve) => server.close(resolve)),
  };
  client = connect(listener.address, { callTimeoutMs: 2_000 });
});

after(async () => {
  client?.close();
  await listener?.close();
});

/** The error `fn` throws or its promise rejects with (null when it succeeds). */
async function failure(fn) {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  return null;
}

/** Asserts that each of `cases` ([call, message pattern]) fails with a TypeError matching it. */
async function assertRefused(cases) {
  for (const [call, pattern] of cases) {
    const err = await failure(call);
    assert.ok(err instanceof TypeError, `${call}: ${err}`);
    assert.match(err.message, pattern);
  }
  assert.equal(listener.connections, 0, 'no call reached the network');
}

describe('unknown options are refused before any call', { timeout: TEST_TIMEOUT_MS }, () => {
  test('each method with options names an unknown one and lists the known ones', async () => {
    await assertRefused([
      [() => client.listSessions({ pagesize: 5 }), /^listSessions: unknown key 'pagesize'; known: pageSize, pageToken$/],
      [() => client.cancelTurn('s', { reasn: 'x' }), /^cancelTurn: unknown key 'reasn'; known: reason$/],
      [() => client.getMessages('s', { page_size: 5 }), /^getMessages: unknown key 'page_size'; known: pageSize$/],
      [() => client.confirmToolCall('s', 'c', true, { reasn: 'x' }), /^confirmToolCall: unknown key 'reasn'; known: reason$/],
      [() => client.claimExternalTasks('s', { clientId: 'c', lease: 5 }),
        /^claimExternalTasks: unknown key 'lease'; known: clientId, maxTasks, leaseSeconds, waitSeconds$/],
      [() => client.renewExternalTaskLease('s', 't', 'c', { lease: 5 }),
        /^renewExternalTaskLease: unknown key 'lease'; known: leaseSeconds$/],
      [() => client.runExternalTasks('s', 'c', () => 'x', { wait: 1 }),
        /^runExternalTasks: unknown key 'wait'; known: signal, maxTasks, leaseSeconds, waitSeconds, onError$/],
      [() => client.drainWorker('w', { reasn: 'x' }), /^drainWorker: unknown key 'reasn'; known: reason$/],
    ]);
    // The streams throw at once, as for any other bad argument.
    assert.throws(() => client.sendMessage('s', 'x', { timeout: 5 }),
      { name: 'TypeError', message: /^sendMessage: unknown key 'timeout'; known: signal, timeoutMs, onResume$/ });
    assert.throws(() => client.watchEvents('s', { after: 5n }),
      { name: 'TypeError', message: /^watchEvents: unknown key 'after'; known: afterSequence, follow, signal, / });
    assert.equal(listener.connections, 0, 'no call reached the network');
  });

  test('the call options of each unary method are checked too', async () => {
    const callOptions = { timeout: 5 };
    await assertRefused([
      [() => client.createSession({ workspace: '/w' }, callOptions), /^createSession: call options: unknown key 'timeout'; known: timeoutMs, signal$/],
      [() => client.getSession('s', callOptions), /^getSession: call options: unknown key 'timeout'/],
      [() => client.deleteSession('s', callOptions), /^deleteSession: call options: unknown key 'timeout'/],
      [() => client.listTools('s', callOptions), /^listTools: call options: unknown key 'timeout'/],
      [() => client.completeExternalTask('s', 't', 'c', { output: 'x' }, callOptions),
        /^completeExternalTask: call options: unknown key 'timeout'/],
      [() => client.listWorkers({ pageSize: 5 }), /^listWorkers: call options: unknown key 'pageSize'; known: timeoutMs, signal$/],
      [() => client.getQueueStats(callOptions), /^getQueueStats: call options: unknown key 'timeout'/],
      [() => client.getServerInfo({ deadline: 5 }), /^getServerInfo: call options: unknown key 'deadline'/],
    ]);
  });

  test('so are the objects they take: lane settings, a raw config or queue, a ToolResult', async () => {
    await assertRefused([
      [() => client.createSession({ workspace: '/w', lanes: { execute: { mode: 'external', timout: 5 } } }),
        /^lanes\.execute: unknown key 'timout'; known: mode, timeout$/],
      [() => client.createSession({ workspace: '/w', config: { systemPromt: 'x' } }),
        /\.config: unknown key 'systemPromt'; known: .*\bsystemPrompt\b/],
      [() => client.createSession({ workspace: '/w', queue: { queryConcurency: 2 } }),
        /\.config\.queue: unknown key 'queryConcurency'; known: queryConcurrency, /],
      [() => client.completeExternalTask('s', 't', 'c', { outptu: 'x' }), /^result: unknown key 'outptu'; known: output, /],
    ]);
  });

  test('connect refuses an unknown option', () => {
    assert.throws(() => connect(listener.address, { tokne: 'secret' }), {
      name: 'TypeError',
      message: /^connect options: unknown key 'tokne'; known: token, credentials, callTimeoutMs, channelOptions, protosDir$/,
    });
  });
});

describe('bad values', { timeout: TEST_TIMEOUT_MS }, () => {
  test('a bad sandbox mode is refused naming the documented spellings', async () => {
    await assertRefused([
      [() => client.createSession({ workspace: '/w', sandbox: { mode: 'sealed' } }),
        /^sandbox\.mode: "sealed" is not one of 'workspace-write', 'read-only', 'off' \(or SANDBOX_MODE_\*\)$/],
    ]);
  });
});

describe('addresses are HOST:PORT, checked before dialing', { timeout: TEST_TIMEOUT_MS }, () => {
  test('connect takes HOST:PORT, [IPV6]:PORT, unix:PATH and unix-abstract:NAME', () => {
    for (const address of ['127.0.0.1:50051', ' localhost:1 ', '[::1]:65535', 'unix:/tmp/codelane.sock',
      'unix-abstract:codelane']) {
      const c = connect(address);
      assert.equal(c.address, address.trim());
      c.close();
    }
  });

  test('connect refuses anything else with a TypeError saying what to write (the CLI\'s wording)', () => {
    for (const [address, message] of [
      ['127.0.0.1', "'127.0.0.1' has no port: give HOST:PORT, e.g. 127.0.0.1:50051"],
      ['[::1]', "'[::1]' has no port: give [IPV6]:PORT, e.g. [::1]:50051"],
      ['::1:50051', "'::1:50051': write an IPv6 address in brackets, e.g. [::1]:50051"],
      ['http://example.com:8080/', "'http://example.com:8080/' is a URL: give HOST:PORT without http://, e.g. example.com:8080"],
      [':50051', "':50051' has no host: give HOST:PORT, e.g. 127.0.0.1:50051"],
      ['host:0', "'host:0': the port must be a number from 1 to 65535"],
      ['host:65536', "'host:65536': the port must be a number from 1 to 65535"],
      ['host:http', "'host:http': the port must be a number from 1 to 65535"],
      ['host name:1', "'host name:1' is not HOST:PORT, e.g. 127.0.0.1:50051"],
      ['unix:', "'unix:' names no socket: give unix:/path/to/socket"],
      ['', 'the address is empty: give HOST:PORT, e.g. 127.0.0.1:50051'],
      [undefined, 'the address must be a string HOST:PORT, e.g. 127.0.0.1:50051; got undefined'],
    ]) {
      assert.throws(() => connect(address), { name: 'TypeError', message }, String(address));
      assert.throws(() => parseAddress(address), { name: 'TypeError', message }, String(address));
    }
  });

  /** Runs an example with `args` until it exits (killed if the test ends first): {code, stderr}. */
  function runExample(relativePath, args, signal) {
    const script = fileURLToPath(new URL(`../examples/${relativePath}`, import.meta.url));
    const env = { ...process.env };
    for (const name of ['CODELANE_SERVER', 'CODELANE_ADDRESS', 'CODELANE_HUB']) delete env[name];
    const child = spawn(process.execPath, [script, ...args], { env, signal, killSignal: 'SIGKILL', stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    return new Promise((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code) => resolve({ code, stderr }));
    });
  }

  test('the examples refuse a bare host as a usage error (exit 2) instead of dialing port 443', async (t) => {
    for (const [example, args, flag] of [
      ['run_session.js', ['/tmp/ws', 'x', '--server', '127.0.0.1'], '--server'],
      ['confirm_and_external.js', ['/tmp/ws', '--server', '127.0.0.1'], '--server'],
      ['worker/word_count_worker.js', ['--connect', '127.0.0.1'], '--connect'],
    ]) {
      const { code, stderr } = await runExample(example, args, t.signal);
      assert.equal(code, 2, `${example}: ${stderr}`);
      assert.match(stderr, new RegExp(`: ${flag}: '127\\.0\\.0\\.1' has no port: give HOST:PORT, e\\.g\\. 127\\.0\\.0\\.1:50051\n`),
        example);
    }
  });
});
