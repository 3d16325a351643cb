#!/usr/bin/env node
// A codelane tool worker in Node.js, written from protos/codelane/v1/worker.proto and
// docs/protocol.md alone (it borrows only the client's address check). It offers one Query tool,
// `word_count` (lines, words and characters of a text, as `wc` counts them), which needs no
// workspace files.
//
//   node examples/worker/word_count_worker.js --connect HOST:PORT [--token T] [--id ID] [--slots N]
//
// --connect defaults to $CODELANE_HUB, --token to $CODELANE_WORKER_TOKEN. It dials the hub,
// says Hello, heartbeats at the interval the Welcome gives, answers every Assign with one
// CallResult carrying its dispatch_id (ignoring the Assign's workspace snapshot: its tool reads
// no files, so it reports no Holdings), drains on the hub's Drain or on SIGTERM
// (Draining, finish, half-close, exit 0), reconnects with backoff when the hub goes away, and
// exits non-zero when the hub refuses it for good (3: the token; 2: the Hello).

import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

// The client's address check, so that --connect takes what every codelane command takes.
import { parseAddress } from '../../src/client.js';

const VERSION = '0.1.0';
const PROTOS_DIR = fileURLToPath(new URL('../../../../protos', import.meta.url));
const BACKOFF_INITIAL_MS = 200;
const BACKOFF_MAX_MS = 10_000;
const EXIT_REJECTED = 2;
const EXIT_UNAUTHENTICATED = 3;
// Statuses after which reconnecting cannot help (docs/protocol.md, "Errors").
const REJECTIONS = new Map([
  [grpc.status.UNAUTHENTICATED, EXIT_UNAUTHENTICATED],
  [grpc.status.PERMISSION_DENIED, EXIT_UNAUTHENTICATED],
  [grpc.status.INVALID_ARGUMENT, EXIT_REJECTED],
  // Another live stream holds our id (and we hold no reconnect token it accepts).
  [grpc.status.ALREADY_EXISTS, EXIT_REJECTED],
]);

export const WORD_COUNT = Object.freeze({
  name: 'word_count',
  description:
    'Count the lines, words and characters of a text, as `wc` does: lines are newline characters, words are ' +
    'runs of non-whitespace, characters are Unicode code points. Answers "LINES WORDS CHARACTERS".',
  parametersJsonSchema: JSON.stringify({
    type: 'object',
    properties: { text: { type: 'string', description: 'The text to count.' } },
    required: ['text'],
    additionalProperties: false,
  }),
  lane: 'LANE_QUERY',
  idempotent: true,
  requiredLabels: {},
});

/** Counts like `wc`: {lines, words, characters}. */
export function wordCount(text) {
  const lines = (text.match(/\n/g) || []).length;
  const words = (text.match(/\S+/gu) || []).length;
  const characters = [...text].length;
  return { lines, words, characters };
}

/** The result of one call of word_count, as a ToolResult (without the fields the hub sets). */
export function runWordCount(argumentsJson) {
  let args;
  try {
    args = JSON.parse(argumentsJson || '{}');
  } catch (err) {
    return invalid(`arguments of word_count are not valid JSON: ${err.message}`);
  }
  if (typeof args !== 'object' || args === null || Array.isArray(args)) {
    return invalid('arguments of word_count must be a JSON object');
  }
  const extra = Object.keys(args).filter((key) => key !== 'text');
  if (extra.length) return invalid(`word_count takes only "text", not ${extra.map((k) => JSON.stringify(k)).join(', ')}`);
  if (typeof args.text !== 'string') return invalid('word_count needs "text", a string');
  const counts = wordCount(args.text);
  return {
    output: `${counts.lines} ${counts.words} ${counts.characters}`,
    isError: false,
    errorKind: 'ERROR_KIND_UNSPECIFIED',
    metadataJson: JSON.stringify(counts),
  };
}

function invalid(output) {
  return { output, isError: true, errorKind: 'ERROR_KIND_INVALID_ARGUMENTS' };
}

// -- the worker ----------------------------------------------------------------------------------

function loadHub() {
  const definition = protoLoader.loadSync(['codelane/v1/worker.proto'], {
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTOS_DIR],
  });
  return grpc.loadPackageDefinition(definition).codelane.v1.WorkerHubService;
}

function durationMs(duration) {
  return duration ? Number(duration.seconds) * 1000 + duration.nanos / 1e6 : 0;
}

function runTime(startedNs) {
  const ns = process.hrtime.bigint() - startedNs;
  return { seconds: String(ns / 1_000_000_000n), nanos: Number(ns % 1_000_000_000n) };
}

function log(message) {
  process.stderr.write(`${new Date().toISOString()} word_count worker: ${message}\n`);
}

class Worker {
  constructor({ address, token, workerId, slots }) {
    this.address = address;
    this.token = token;
    this.workerId = workerId;
    this.slots = slots;
    this.Hub = loadHub();
    this.client = new this.Hub(address, grpc.credentials.createInsecure());
    this.reconnectToken = '';
    this.draining = false;
    this.running = new Map(); // dispatch id -> {cancelled}
    this.stream = null;
  }

  /** Connects and serves until drained or refused; resolves to the exit code. */
  async run() {
    let delay = BACKOFF_INITIAL_MS;
    for (;;) {
      const started = Date.now();
      const ended = await this.serve();
      if (ended.exit !== undefined) return ended.exit;
      if (this.draining) return 0;
      if (Date.now() - started > BACKOFF_MAX_MS) delay = BACKOFF_INITIAL_MS;
      log(`the stream ended (${ended.why}); reconnecting`);
      // Full jitter: the workers of a restarted hub do not all come back at once.
      await new Promise((resolve) => setTimeout(resolve, Math.random() * delay));
      delay = Math.min(delay * 2, BACKOFF_MAX_MS);
    }
  }

  /** One stream, from Hello to its end: {exit} when the worker must stop, else {why}. */
  serve() {
    return new Promise((resolve) => {
      const metadata = new grpc.Metadata();
      if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
      const stream = this.client.Connect(metadata);
      this.stream = stream;
      let heartbeat = null;
      const finish = (outcome) => {
        clearInterval(heartbeat);
        this.stream = null;
        resolve(outcome);
      };
      stream.on('data', (message) => {
        switch (message.message) {
          case 'welcome': {
            this.reconnectToken = message.welcome.reconnectToken;
            const every = durationMs(message.welcome.heartbeatInterval) || 2000;
            heartbeat = setInterval(() => this.send({
              heartbeat: { activeCalls: this.running.size, loadAverage: os.loadavg()[0] },
            }), every);
            log(`connected to ${this.address} as ${message.welcome.workerId} (heartbeat every ${every} ms)`);
            if (this.draining) this.drain('draining before the Welcome');
            break;
          }
          case 'assignments':
            for (const assign of message.assignments.assigns) this.start(assign);
            break;
          case 'cancel': {
            // Unknown or finished ids are ignored; a running call still gets its CallResult.
            const call = this.running.get(message.cancel.dispatchId);
            if (call) call.cancelled = true;
            break;
          }
          case 'drain':
            log(`the hub asked us to drain: ${message.drain.reason}`);
            this.drain(message.drain.reason);
            break;
          default:
            break; // a message of a newer hub: ignored
        }
      });
      // A non-OK status is also emitted as 'error'; 'status' comes once, whatever the ending.
      stream.on('error', () => {});
      stream.on('status', ({ code, details }) => {
        const exit = REJECTIONS.get(code);
        if (exit !== undefined) {
          log(`the hub refused this worker (${grpc.status[code]}): ${details}`);
          finish({ exit: exit ?? EXIT_REJECTED });
        } else {
          finish({ why: code === grpc.status.OK ? 'the hub ended it' : `${grpc.status[code]}: ${details}` });
        }
      });
      stream.write({
        hello: {
          workerId: this.workerId,
          version: VERSION,
          tools: [WORD_COUNT],
          slots: this.slots,
          hostname: os.hostname(),
          reconnectToken: this.reconnectToken,
        },
      });
    });
  }

  send(message) {
    if (this.stream && this.stream.writable) this.stream.write(message);
  }

  start(assign) {
    const call = { cancelled: false };
    this.running.set(assign.dispatchId, call);
    // Off the reading path, so a batch of assigns is read whole before they run.
    setImmediate(() => {
      const started = process.hrtime.bigint();
      let result;
      if (call.cancelled) {
        result = { output: `${assign.toolName} was cancelled on the worker`, isError: true,
          errorKind: 'ERROR_KIND_CANCELLED' };
      } else if (assign.toolName !== WORD_COUNT.name) {
        result = { output: `unknown tool ${JSON.stringify(assign.toolName)}; this worker offers word_count`,
          isError: true, errorKind: 'ERROR_KIND_UNKNOWN_TOOL' };
      } else {
        result = runWordCount(assign.argumentsJson);
      }
      this.running.delete(assign.dispatchId);
      this.send({
        results: {
          results: [{
            callId: assign.callId,
            attempt: assign.attempt,
            dispatchId: assign.dispatchId,
            result: { ...result, runTime: runTime(started) },
          }],
        },
      });
      if (this.draining && this.running.size === 0) this.closeWhenDrained();
    });
  }

  /** Says Draining, then half-closes once the running calls are answered; the hub ends the stream. */
  drain(reason) {
    if (!this.stream) {
      this.draining = true;
      return;
    }
    if (this.drainSent) return;
    this.draining = true;
    this.drainSent = true;
    this.send({ draining: { reason: reason || 'worker draining' } });
    if (this.running.size === 0) this.closeWhenDrained();
  }

  closeWhenDrained() {
    if (this.stream && !this.halfClosed) {
      this.halfClosed = true;
      this.stream.end();
    }
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      connect: { type: 'string', default: process.env.CODELANE_HUB || '' },
      token: { type: 'string', default: process.env.CODELANE_WORKER_TOKEN || '' },
      id: { type: 'string', default: `${os.hostname()}/node-${process.pid}` },
      slots: { type: 'string', default: '4' },
    },
  });
  const usage = 'usage: word_count_worker.js --connect HOST:PORT [--token T] [--id ID] [--slots N>=1]\n';
  const slots = Number.parseInt(values.slots, 10);
  if (!values.connect || !(slots >= 1)) {
    process.stderr.write(usage);
    return 2;
  }
  // A bare host would dial port 443 and be retried forever: refuse it, as the CLI does.
  let address;
  try {
    address = parseAddress(values.connect);
  } catch (err) {
    process.stderr.write(`word_count_worker.js: --connect: ${err.message}\n${usage}`);
    return 2;
  }
  const worker = new Worker({ address, token: values.token, workerId: values.id, slots });
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => worker.drain(`${signal} received`));
  return worker.run();
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  main().then((code) => process.exit(code), (err) => {
    log(`failed: ${err.stack || err}`);
    process.exit(1);
  });
}
