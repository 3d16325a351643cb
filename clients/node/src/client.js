// The codelane Node.js client: sessions, turns and replayable event streams over gRPC, as plain
// JavaScript objects.
//
//   import { connect } from '@codelane/client';
//   const client = connect('127.0.0.1:50051', { token: process.env.CODELANE_TOKEN });
//   const session = await client.createSession({ workspace: '/path/to/repo' });
//   for await (const ev of client.sendMessage(session.sessionId, 'Find the TODOs')) {
//     console.log(ev.sequence, ev.kind);
//     if (ev.kind === 'confirmation_required') {
//       await client.confirmToolCall(session.sessionId, ev.confirmationRequired.call.callId, true);
//     }
//   }
//   client.close();
//
// The contract is loaded at run time from the repository's protos/ directory (no generated code)
// with @grpc/proto-loader. Conventions of the objects this module returns (see README.md):
//
// - field names are lowerCamelCase (proto-loader keepCase: false): `sessionId`, `lastSequence`;
// - a oneof is named by its proto field name, in snake_case, under the oneof's own name: an
//   event has `kind: 'tool_call_finished'` and its payload under `toolCallFinished`;
// - every 64-bit integer (sequences, message indexes, token counts, counters) is a BigInt, so
//   nothing above 2^53 loses precision (proto-loader decodes them as decimal strings with
//   `longs: String`; this module turns those into BigInt). Inputs accept a BigInt, a safe
//   integer Number, or a decimal string;
// - enums are their proto names as strings ('LANE_QUERY', 'STOP_REASON_END_TURN');
// - google.protobuf.Timestamp is a Date (millisecond precision), google.protobuf.Duration is a
//   Number of seconds (inputs accept the same, or {seconds, nanos});
// - unset message fields are null, unset scalars their zero value, an absent proto3 `optional`
//   field (ToolResult.exitCode) is undefined.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

export { grpc };

const PACKAGE = 'codelane.v1';
const EVENT_TYPE = `${PACKAGE}.Event`;
/** The server address used when none is given, as in the Python SDK and the CLI. */
export const DEFAULT_ADDRESS = '127.0.0.1:50051';
const DEFAULT_PROTOS_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../protos');
const PROTO_FILES = ['codelane/v1/session.proto', 'codelane/v1/admin.proto'];
const DEFAULT_CALL_TIMEOUT_MS = 30_000;
// The server's message limit, each way.
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
// Longest pause between a channel's connection attempts (gRPC's default is 2 minutes).
const MAX_RECONNECT_BACKOFF_MS = 2_000;

/**
 * Keepalive pings while a call is open, as the Python SDK sends them: grpc-js sends none unless
 * told, so a stream over a connection that died without a word (its peer's host gone, a NAT or
 * firewall that forgot it, a server stopped) waited for ever instead of breaking and being
 * resumed. 30 s apart: the server takes pings 15 s apart or more (docs/protocol.md). Not part of
 * the API: the tests make them quicker, as they shorten `_resumeTiming`.
 */
export const _keepalive = { timeMs: 30_000, timeoutMs: 10_000 };

const LOADER_OPTIONS = Object.freeze({
  keepCase: false, // lowerCamelCase field names
  longs: String, // int64 decoded as decimal strings, then turned into BigInt below: no precision loss
  enums: String, // enum values as their names
  defaults: true, // unset scalars get their zero value, unset messages null
  oneofs: true, // virtual oneof fields naming the member that is set (renamed to snake_case below)
});

const INT64_TYPES = new Set(['TYPE_INT64', 'TYPE_UINT64', 'TYPE_SINT64', 'TYPE_FIXED64', 'TYPE_SFIXED64']);

// ---------------------------------------------------------------------------------------------
// Loading the contract

const loaded = new Map(); // protos dir -> { packageDefinition, grpcObject }

function load(protosDir) {
  let entry = loaded.get(protosDir);
  if (!entry) {
    const packageDefinition = protoLoader.loadSync(PROTO_FILES, { ...LOADER_OPTIONS, includeDirs: [protosDir] });
    const grpcObject = grpc.loadPackageDefinition(packageDefinition);
    entry = { packageDefinition, grpcObject, codec: new Codec(packageDefinition) };
    loaded.set(protosDir, entry);
  }
  return entry;
}

// ---------------------------------------------------------------------------------------------
// Conversion between proto-loader objects and this module's plain objects, driven by the
// message descriptors proto-loader exposes (field names, types, map entries).

function snakeCase(name) {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/** Turns a BigInt, a safe-integer Number or a decimal string into the decimal string protobufjs takes. */
function int64ToWire(value, where) {
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value)) {
      throw new TypeError(`${where}: ${value} is not a safe integer; pass a BigInt or a decimal string`);
    }
    return String(value);
  }
  if (typeof value === 'string' && /^-?\d+$/.test(value)) return value;
  throw new TypeError(`${where}: expected a BigInt, an integer or a decimal string, got ${typeof value} ${String(value)}`);
}

/**
 * Refuses an options object holding a key outside `known`, naming it and listing the known ones
 * (`shown`, when some known keys are aliases best left unmentioned): a misspelt option would
 * otherwise be dropped without a word and the server's default used instead.
 */
function checkKeys(where, object, known, shown = known) {
  if (typeof object !== 'object' || object === null || Array.isArray(object)) {
    throw new TypeError(`${where}: expected an object {${shown.join(', ')}}, got ${String(object)}`);
  }
  const unknown = Object.keys(object).filter((k) => !known.includes(k));
  if (unknown.length > 0) {
    const keys = unknown.map((k) => `'${k}'`).join(', ');
    throw new TypeError(`${where}: unknown ${unknown.length === 1 ? 'key' : 'keys'} ${keys}; known: ${shown.join(', ')}`);
  }
}

class Codec {
  constructor(packageDefinition) {
    this.defs = packageDefinition;
    this.resolved = new Map(); // "scope typeName" -> {fullName, descriptor}
  }

  /** The descriptor of `typeName` as referenced from the message `scope` (full name). */
  resolve(typeName, scope, scopeDescriptor) {
    const key = `${scope} ${typeName}`;
    let found = this.resolved.get(key);
    if (!found) {
      found = this.lookup(typeName, scope, scopeDescriptor);
      this.resolved.set(key, found);
    }
    return found;
  }

  lookup(typeName, scope, scopeDescriptor) {
    const name = typeName.replace(/^\./, '');
    const nested = scopeDescriptor?.nestedType?.find((t) => t.name === name);
    if (nested) return { fullName: `${scope}.${name}`, descriptor: nested };
    // Walk outwards from the scope's package, as protobuf name resolution does.
    const parts = scope.split('.');
    for (let i = parts.length - 1; i >= 0; i--) {
      const candidate = [...parts.slice(0, i), name].join('.');
      const def = this.defs[candidate];
      if (def && def.type) return { fullName: candidate, descriptor: def.type };
    }
    throw new Error(`codelane client: cannot resolve message type ${typeName} from ${scope}`);
  }

  /**
   * An enum input -> its proto name. Takes the proto name ('LANE_MODE_EXTERNAL') or the name
   * without the enum's prefix, in any case ('external'); anything else is a TypeError naming
   * `where` and the accepted values, each short name written by `spell` as the README documents
   * it (sandbox modes with hyphens: 'read-only').
   */
  enumValue(fullName, prefix, value, where, spell = (name) => name) {
    const def = this.defs[fullName];
    if (!def || !def.type?.value) throw new Error(`codelane client: unknown enum ${fullName}`);
    const names = def.type.value.map((v) => v.name).filter((n) => !n.endsWith('_UNSPECIFIED'));
    if (typeof value === 'string') {
      const upper = value.toUpperCase();
      const name = upper.startsWith(prefix) ? upper : `${prefix}${upper}`;
      if (names.includes(name)) return name;
    }
    const short = names.map((n) => `'${spell(n.slice(prefix.length).toLowerCase())}'`).join(', ');
    throw new TypeError(`${where}: ${JSON.stringify(value)} is not one of ${short} (or ${prefix}*)`);
  }

  descriptor(fullName) {
    const def = this.defs[fullName];
    if (!def || !def.type) throw new Error(`codelane client: unknown message type ${fullName}`);
    return def.type;
  }

  /** A proto-loader decoded message of type `fullName` -> a plain object (BigInt, Date, ...). */
  decode(fullName, value, descriptor = this.descriptor(fullName)) {
    if (value === null || value === undefined) return null;
    if (fullName === 'google.protobuf.Timestamp') {
      return new Date(Number(value.seconds ?? 0) * 1000 + Math.floor((value.nanos ?? 0) / 1e6));
    }
    if (fullName === 'google.protobuf.Duration') {
      return Number(value.seconds ?? 0) + (value.nanos ?? 0) / 1e9;
    }
    const out = {};
    const fieldNames = new Set();
    for (const field of descriptor.field) {
      fieldNames.add(field.name);
      const v = value[field.name];
      if (v === undefined) continue; // unset oneof member or absent proto3 optional
      out[field.name] = this.decodeField(field, v, fullName, descriptor);
    }
    // Remaining keys are proto-loader's virtual oneof fields: `kind: 'turnStarted'` for a real
    // oneof, `_exitCode: 'exitCode'` for the synthetic oneof of a proto3 optional field.
    for (const [key, v] of Object.entries(value)) {
      if (fieldNames.has(key) || typeof v !== 'string') continue;
      if (key.startsWith('_') && v === key.slice(1)) continue;
      out[key] = snakeCase(v);
    }
    // An event of a kind this client does not know (a newer server's) carries no payload it can
    // read: its kind is 'unknown', as in the Python SDK, so code switching on kind sees one.
    if (fullName === EVENT_TYPE && out.kind === undefined) out.kind = 'unknown';
    return out;
  }

  decodeField(field, v, scope, scopeDescriptor) {
    if (field.type === 'TYPE_MESSAGE') {
      const { fullName, descriptor } = this.resolve(field.typeName, scope, scopeDescriptor);
      if (descriptor.options?.mapEntry) {
        const valueField = descriptor.field.find((f) => f.name === 'value');
        const out = {};
        for (const [k, mv] of Object.entries(v)) out[k] = this.decodeField(valueField, mv, fullName, descriptor);
        return out;
      }
      if (field.label === 'LABEL_REPEATED') return v.map((item) => this.decode(fullName, item, descriptor));
      return this.decode(fullName, v, descriptor);
    }
    if (INT64_TYPES.has(field.type)) {
      const toBig = (x) => BigInt(typeof x === 'object' && x !== null ? x.toString() : x);
      return field.label === 'LABEL_REPEATED' ? v.map(toBig) : toBig(v);
    }
    return v;
  }

  /** A plain request object of type `fullName` -> what proto-loader's serializer takes. */
  encode(fullName, value, descriptor = this.descriptor(fullName), where = fullName) {
    if (value === null || value === undefined) return undefined;
    if (fullName === 'google.protobuf.Timestamp') {
      if (value instanceof Date) {
        const ms = value.getTime();
        const seconds = Math.floor(ms / 1000);
        return { seconds: String(seconds), nanos: (ms - seconds * 1000) * 1e6 };
      }
      return { seconds: int64ToWire(value.seconds ?? 0, `${where}.seconds`), nanos: value.nanos ?? 0 };
    }
    if (fullName === 'google.protobuf.Duration') {
      if (typeof value === 'number') {
        if (!Number.isFinite(value)) throw new TypeError(`${where}: duration must be finite`);
        const seconds = Math.trunc(value);
        return { seconds: String(seconds), nanos: Math.round((value - seconds) * 1e9) };
      }
      return { seconds: int64ToWire(value.seconds ?? 0, `${where}.seconds`), nanos: value.nanos ?? 0 };
    }
    // Raw messages from the caller (createSession's `config` and `queue`) must not lose a
    // misspelt field silently either.
    checkKeys(where, value, descriptor.field.map((f) => f.name));
    const out = {};
    for (const field of descriptor.field) {
      const v = value[field.name];
      if (v === undefined || v === null) continue;
      const at = `${where}.${field.name}`;
      if (field.type === 'TYPE_MESSAGE') {
        const { fullName: sub, descriptor: subDescriptor } = this.resolve(field.typeName, fullName, descriptor);
        if (subDescriptor.options?.mapEntry) {
          out[field.name] = Object.fromEntries(Object.entries(v).map(([k, mv]) => [k, String(mv)]));
        } else if (field.label === 'LABEL_REPEATED') {
          out[field.name] = v.map((item, i) => this.encode(sub, item, subDescriptor, `${at}[${i}]`));
        } else {
          out[field.name] = this.encode(sub, v, subDescriptor, at);
        }
      } else if (INT64_TYPES.has(field.type)) {
        out[field.name] = field.label === 'LABEL_REPEATED'
          ? v.map((x, i) => int64ToWire(x, `${at}[${i}]`))
          : int64ToWire(v, at);
      } else {
        out[field.name] = v;
      }
    }
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Errors: the grpc-js ServiceError itself (code, details, metadata), with the server's
// google.rpc.ErrorInfo, when it sent one, as `errorInfo = {reason, domain, metadata}`.

function readVarint(buf, pos) {
  let result = 0n;
  let shift = 0n;
  for (;;) {
    if (pos >= buf.length) throw new RangeError('truncated varint');
    const byte = buf[pos++];
    result |= BigInt(byte & 0x7f) << shift;
    if ((byte & 0x80) === 0) return [result, pos];
    shift += 7n;
  }
}

/** Minimal protobuf wire reader: yields [fieldNumber, wireType, value] (value: BigInt or Buffer). */
function* wireFields(buf) {
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const number = Number(key >> 3n);
    const wireType = Number(key & 7n);
    if (wireType === 0) {
      let v;
      [v, pos] = readVarint(buf, pos);
      yield [number, wireType, v];
    } else if (wireType === 2) {
      let len;
      [len, pos] = readVarint(buf, pos);
      const end = pos + Number(len);
      if (end > buf.length) throw new RangeError('truncated field');
      yield [number, wireType, buf.subarray(pos, end)];
      pos = end;
    } else if (wireType === 1) {
      pos += 8;
    } else if (wireType === 5) {
      pos += 4;
    } else {
      throw new RangeError(`unsupported wire type ${wireType}`);
    }
  }
}

const ERROR_INFO_TYPE_URL = 'type.googleapis.com/google.rpc.ErrorInfo';

/** Decodes the ErrorInfo of a grpc-status-details-bin trailer (a google.rpc.Status), or null. */
export function errorInfoFromStatusDetails(buf) {
  try {
    for (const [number, wireType, any] of wireFields(buf)) {
      if (number !== 3 || wireType !== 2) continue; // Status.details (repeated Any)
      let typeUrl = '';
      let payload = null;
      for (const [n, wt, v] of wireFields(any)) {
        if (n === 1 && wt === 2) typeUrl = v.toString('utf8');
        if (n === 2 && wt === 2) payload = v;
      }
      if (typeUrl !== ERROR_INFO_TYPE_URL || payload === null) continue;
      const info = { reason: '', domain: '', metadata: {} };
      for (const [n, wt, v] of wireFields(payload)) {
        if (wt !== 2) continue;
        if (n === 1) info.reason = v.toString('utf8');
        else if (n === 2) info.domain = v.toString('utf8');
        else if (n === 3) {
          let k = '';
          let val = '';
          for (const [en, ewt, ev] of wireFields(v)) {
            if (ewt !== 2) continue;
            if (en === 1) k = ev.toString('utf8');
            else if (en === 2) val = ev.toString('utf8');
          }
          info.metadata[k] = val;
        }
      }
      return info;
    }
  } catch {
    return null; // malformed details: keep the plain grpc error
  }
  return null;
}

function annotate(err) {
  if (err && typeof err === 'object' && err.metadata instanceof grpc.Metadata && err.errorInfo === undefined) {
    const [details] = err.metadata.get('grpc-status-details-bin');
    const info = Buffer.isBuffer(details) ? errorInfoFromStatusDetails(details) : null;
    if (info) err.errorInfo = info;
  }
  return err;
}

// ---------------------------------------------------------------------------------------------
// Streams

function quietCancel(call) {
  call.on('error', () => {}); // the CANCELLED status must not become an unhandled 'error'
  call.cancel(); // no-op when the call already ended
}

const HIGH_WATER = 256; // buffered messages before the stream is paused (gRPC flow control)
const LOW_WATER = 64; // ... and resumed

/**
 * An async iterator over a started server-streaming call, with a `cancel()` method.
 *
 * Listeners are attached at once, so nothing is lost (and no error goes unhandled) when the
 * caller starts iterating later. Messages received before a failure are yielded first, then the
 * iteration throws the grpc error. Leaving a `for await` early (break, throw) cancels the call; a
 * call cancelled by `cancel()` or the AbortSignal ends the iteration quietly.
 */
class CallIterator {
  constructor(call, map, signal) {
    this._call = call;
    this._map = map; // a stream message -> the values it carries (events come in batches)
    this._queue = [];
    this._ready = [];
    this._error = null;
    this._finished = false; // no more messages will arrive
    this._closed = false; // the consumer is done: nothing more is yielded
    this._cancelledByUser = false;
    this._waiters = [];
    this._signal = signal;
    this._onAbort = () => this.cancel();

    call.on('data', (message) => {
      this._queue.push(message);
      if (this._queue.length >= HIGH_WATER) call.pause();
      this._notify();
    });
    call.on('end', () => {
      this._finished = true;
      this._notify();
    });
    call.on('error', (err) => {
      this._error ??= err;
      // grpc-js ends the readable side before it emits the error: drain what is still buffered
      // and let 'end' finish the iteration; finish now when nothing is.
      if (call.readableLength === 0) this._finished = true;
      else call.resume();
      this._notify();
    });
    if (signal) {
      if (signal.aborted) this.cancel();
      else signal.addEventListener('abort', this._onAbort, { once: true });
    }
  }

  _notify() {
    const waiters = this._waiters.splice(0);
    for (const wake of waiters) wake();
  }

  _cleanup() {
    this._closed = true;
    this._queue.length = 0;
    this._ready.length = 0;
    this._signal?.removeEventListener('abort', this._onAbort);
    this._notify();
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  async next() {
    for (;;) {
      if (this._closed) return { value: undefined, done: true };
      if (this._ready.length > 0) return { value: this._ready.shift(), done: false };
      if (this._queue.length > 0) {
        const message = this._queue.shift();
        if (this._queue.length <= LOW_WATER && this._call.isPaused()) this._call.resume();
        this._ready.push(...this._map(message));
        continue;
      }
      if (this._finished) {
        const err = this._error;
        this._cleanup();
        if (err && !(this._cancelledByUser && err.code === grpc.status.CANCELLED)) throw annotate(err);
        return { value: undefined, done: true };
      }
      await new Promise((resolve) => this._waiters.push(resolve));
    }
  }

  /** Called when a `for await` loop is left early: cancels the call. */
  async return(value) {
    if (!this._finished) {
      this._cancelledByUser = true;
      quietCancel(this._call);
    }
    this._cleanup();
    return { value, done: true };
  }

  /** Cancels the call; the iteration ends (quietly) after the messages already received. */
  cancel() {
    if (this._finished || this._cancelledByUser) return;
    this._cancelledByUser = true;
    quietCancel(this._call);
  }
}

// A sendMessage or watchEvents whose stream breaks goes on with a WatchEvents resumed after the
// last event it yielded; it gives up (throwing the error) once RESUME_WITHIN_MS have passed since
// the break without a reply from a resumed stream, long enough for a server to restart. Counted
// from the break, not from the last event: a watch of an idle session, or a send waiting on a
// long tool call, may go quiet for much longer and must still be resumed when its connection then
// drops. A resume right after progress is immediate; those that follow without a new event wait
// RESUME_BACKOFF_INITIAL_MS, doubled up to RESUME_BACKOFF_MAX_MS (a resumed stream that only says
// it is caught up, then breaks again, keeps its pause: a server that cuts every stream is not
// hammered). The Python SDK (codelane.client) behaves the same.
const RESUME_WITHIN_MS = 20_000;
const RESUME_BACKOFF_INITIAL_MS = 100;
const RESUME_BACKOFF_MAX_MS = 2_000;

/**
 * The resume budget, the pauses between resumes and the clock they are counted on. Not part of
 * the API: the tests shorten them or move the clock on instead of waiting, as the Python tests
 * patch codelane.client's constants and clock.
 */
export const _resumeTiming = {
  withinMs: RESUME_WITHIN_MS,
  backoffInitialMs: RESUME_BACKOFF_INITIAL_MS,
  backoffMaxMs: RESUME_BACKOFF_MAX_MS,
  now: () => performance.now(),
};
// The ErrorInfo reason of the RESOURCE_EXHAUSTED that cuts a subscriber which fell behind.
const SUBSCRIBER_TOO_SLOW = 'SUBSCRIBER_TOO_SLOW';

/** A gRPC status code's name (UNAVAILABLE), as the Python client writes it. */
function codeName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

/** Whether a broken event stream is mended by a new one: the server cut a reader that fell
 * behind, the connection was lost, the stream was reset, or the server cancelled it (a stopping
 * server cancels the calls it has not started: a resume made at once after its SHUTTING_DOWN
 * reaches it then). `closed`: the client was closed, which cancels its calls itself. */
function resumable(err, closed) {
  if (err?.code === grpc.status.RESOURCE_EXHAUSTED) return err.errorInfo?.reason === SUBSCRIBER_TOO_SLOW;
  if (err?.code === grpc.status.CANCELLED) return !closed;
  return err?.code === grpc.status.UNAVAILABLE || err?.code === grpc.status.INTERNAL;
}

/**
 * The events of a stream (sendMessage's or watchEvents'), resumed after the last event yielded
 * each time the stream breaks in a way a new one mends: no event is missed or repeated, and the
 * caught_up marker comes once. A send (`turn: true`) yields only its own turn's events and ends
 * at its turn_finished; a break before its first event is thrown (the turn may not have
 * started). A watch that does not follow ends after its marker. `cancel()`, the AbortSignal and
 * leaving a `for await` loop end it as a single stream's iteration does.
 */
class ResumingIterator {
  constructor(first, reopen, { afterSequence, follow, turn, signal, onResume, closed }) {
    this._call = first;
    this._reopen = reopen; // (afterSequence) => a CallIterator of WatchEvents
    this._closed = closed; // () => whether the client was closed (its calls cancelled by it)
    this._signal = signal;
    this._onResume = onResume;
    this._stopped = false;
    this._wake = null; // ends a pause between resumes early
    this._items = this._run(BigInt(afterSequence), follow, turn);
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    return this._items.next();
  }

  async return(value) {
    this.cancel();
    return this._items.return(value);
  }

  /** Ends the iteration (quietly) after the events already received. */
  cancel() {
    this._stopped = true;
    this._call.cancel();
    this._wake?.();
  }

  _ended() {
    return this._stopped || Boolean(this._signal?.aborted);
  }

  async *_run(after, follow, turn) {
    let last = after;
    let caughtUp = false;
    let turnId = '';
    let brokenAt = null; // when the stream broke, since when no stream has answered
    let broke = null; // why it broke then (a server shutting down, say), named when it is given up
    let delayMs = 0;
    // A resumed stream that neither answers nor fails is given up once the budget is spent:
    // grpc-js waits for ever on a server that takes the connection and says nothing (a server
    // stopped, or hung), and the iteration with it.
    let giveUp = null;
    let silent = false;
    try {
      for (;;) {
        let error;
        try {
          for await (const item of this._call) {
            clearTimeout(giveUp);
            brokenAt = broke = null; // the stream answers (a marker counts): a later break is a new one
            if (item.kind === 'caught_up') {
              if (caughtUp || turn) continue;
              caughtUp = true;
            } else if (item.sequence <= last) {
              continue; // yielded before the resume
            } else {
              last = item.sequence;
              delayMs = 0;
              if (turn) {
                turnId ||= item.turnId;
                if (item.turnId !== turnId) continue;
              }
            }
            yield item;
            if (turn && item.kind === 'turn_finished') return;
            if (!turn && !follow && item.kind === 'caught_up') return;
          }
          if (this._ended()) return;
          const why = broke ? ` (${codeName(broke.code)}: ${broke.details ?? broke.message})` : '';
          const details = silent
            ? `no reply from the server in the ${_resumeTiming.withinMs / 1000} s since the event stream broke${why}`
            : 'the event stream ended early';
          error = Object.assign(new Error(details), { code: grpc.status.UNAVAILABLE, details });
        } catch (err) {
          if (this._ended()) return;
          error = err;
        }
        const now = _resumeTiming.now();
        if (brokenAt === null) {
          brokenAt = now; // the budget starts now, however long the stream had been quiet
          broke = error;
        }
        if (silent || !resumable(error, this._closed()) || (turn && last === after) || now - brokenAt > _resumeTiming.withinMs) {
          throw error;
        }
        try {
          this._onResume?.(error, last);
        } catch {
          // the hook is for logging: it must not end the stream
        }
        if (delayMs > 0) {
          await this._pause(delayMs);
          if (this._ended()) return;
        }
        delayMs = Math.min(Math.max(delayMs * 2, _resumeTiming.backoffInitialMs), _resumeTiming.backoffMaxMs);
        this._call = this._reopen(last);
        const resumed = this._call;
        const leftMs = brokenAt + _resumeTiming.withinMs - _resumeTiming.now();
        giveUp = setTimeout(() => {
          silent = true;
          resumed.cancel();
        }, Math.max(0, leftMs));
      }
    } finally {
      clearTimeout(giveUp);
    }
  }

  /** Waits `delayMs` before a resume; an abort (or the iteration's end) wakes it early. */
  async _pause(delayMs) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, delayMs);
      this._wake = () => {
        clearTimeout(timer);
        resolve();
      };
      this._signal?.addEventListener('abort', this._wake, { once: true });
    });
    this._signal?.removeEventListener('abort', this._wake);
    this._wake = null;
  }
}

// ---------------------------------------------------------------------------------------------
// The client

/** What a runExternalTasks handler's race ends with when its task is gone first. */
const GONE = Symbol('the task is gone');

/** Calls runExternalTasks' onError hook; an exception of the hook itself is ignored. */
function report(onError, err, task) {
  try {
    onError?.(err, task);
  } catch {
    // the hook is for logging: it must not stop the loop
  }
}

const CONNECT_OPTIONS = ['token', 'credentials', 'callTimeoutMs', 'channelOptions', 'protosDir'];
const CALL_OPTIONS = ['timeoutMs', 'signal'];
const CREATE_SESSION_OPTIONS = ['workspace', 'model', 'systemPrompt', 'maxTurns', 'maxOutputTokens', 'permissions',
  'lanes', 'externalTaskTimeout', 'sandbox', 'env', 'queue', 'config', 'labels'];

function deadlineIn(ms) {
  return ms && Number.isFinite(ms) && ms > 0 ? new Date(Date.now() + ms) : undefined;
}

/**
 * A server address, checked as the Python CLI checks it: `HOST:PORT`, `[IPV6]:PORT`,
 * `unix:PATH` or `unix-abstract:NAME`, the port from 1 to 65535. The port must be given because
 * gRPC would otherwise dial 443, and a bare host would fail as a connection refused on a port
 * nobody named (or, for a worker, be retried forever). Returns the address without surrounding
 * whitespace; a TypeError saying what is wrong and what to write instead.
 */
export function parseAddress(text) {
  const example = `e.g. ${DEFAULT_ADDRESS}`;
  if (typeof text !== 'string') throw new TypeError(`the address must be a string HOST:PORT, ${example}; got ${String(text)}`);
  const address = text.trim();
  const quoted = `'${text}'`;
  if (!address) throw new TypeError(`the address is empty: give HOST:PORT, ${example}`);
  for (const scheme of ['unix:', 'unix-abstract:']) {
    if (address.startsWith(scheme)) {
      if (!address.slice(scheme.length).replace(/^\/+|\/+$/g, '')) {
        throw new TypeError(`${quoted} names no socket: give ${scheme}/path/to/socket`);
      }
      return address;
    }
  }
  const url = address.indexOf('://');
  if (url >= 0) {
    const instead = address.slice(url + 3).replace(/\/+$/, '') || 'host:50051';
    throw new TypeError(`${quoted} is a URL: give HOST:PORT without ${address.slice(0, url)}://, e.g. ${instead}`);
  }
  if (/\s/.test(address) || address.includes('/')) throw new TypeError(`${quoted} is not HOST:PORT, ${example}`);
  let host;
  let port;
  if (address.startsWith('[')) {
    const close = address.indexOf(']');
    if (close < 0 || address[close + 1] !== ':') {
      throw new TypeError(`${quoted} has no port: give [IPV6]:PORT, e.g. [::1]:50051`);
    }
    host = address.slice(1, close);
    port = address.slice(close + 2);
  } else {
    const colon = address.lastIndexOf(':');
    if (colon < 0) throw new TypeError(`${quoted} has no port: give HOST:PORT, e.g. ${address}:50051`);
    host = address.slice(0, colon);
    port = address.slice(colon + 1);
    if (host.includes(':')) throw new TypeError(`${quoted}: write an IPv6 address in brackets, e.g. [::1]:50051`);
  }
  if (!host) throw new TypeError(`${quoted} has no host: give HOST:PORT, ${example}`);
  if (!/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
    throw new TypeError(`${quoted}: the port must be a number from 1 to 65535`);
  }
  return address;
}

/**
 * Connects to a codelane server (the channel connects lazily, on the first call).
 *
 * @param {string} address  HOST:PORT, e.g. '127.0.0.1:50051' (see parseAddress; anything else
 *   throws a TypeError)
 * @param {object} [options]
 * @param {string} [options.token]  bearer token, sent as `authorization: Bearer <token>`
 * @param {grpc.ChannelCredentials} [options.credentials]  default: insecure (plaintext)
 * @param {number} [options.callTimeoutMs=30000]  deadline of unary calls; 0 for none
 * @param {object} [options.channelOptions]  grpc-js channel options
 * @param {string} [options.protosDir]  directory holding codelane/v1/*.proto (default: the repo's protos/)
 */
export function connect(address, options = {}) {
  return new CodelaneClient(address, options);
}

export class CodelaneClient {
  constructor(address, options = {}) {
    checkKeys('connect options', options, CONNECT_OPTIONS);
    address = parseAddress(address);
    let { channelOptions } = options;
    const { token, credentials, callTimeoutMs = DEFAULT_CALL_TIMEOUT_MS, protosDir } = options;
    const { grpcObject, codec } = load(protosDir ? path.resolve(protosDir) : DEFAULT_PROTOS_DIR);
    const pkg = grpcObject.codelane.v1;
    const creds = credentials ?? grpc.credentials.createInsecure();
    // grpc-js refuses messages over 4 MiB by default; one event or history message may be bigger
    // (the server allows 64 MiB each way). A channel whose server went away tries again after
    // 1 s, then 1.6 times longer each time, up to 2 minutes, and calls meanwhile fail at once:
    // after 16-19 s down it would not try again before the 20 s a broken stream gives a restarting
    // server (RESUME_WITHIN_MS) were spent, so a server back in time was never reached. The
    // caller's options win.
    channelOptions = {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_reconnect_backoff_ms': MAX_RECONNECT_BACKOFF_MS,
      'grpc.keepalive_time_ms': _keepalive.timeMs,
      'grpc.keepalive_timeout_ms': _keepalive.timeoutMs,
      ...channelOptions,
    };
    this.address = address;
    this._codec = codec;
    this._callTimeoutMs = callTimeoutMs;
    this._sessions = new pkg.SessionService(address, creds, channelOptions);
    // Share the first stub's channel.
    this._admin = new pkg.AdminService(address, creds, { ...channelOptions, channelOverride: this._sessions.getChannel() });
    this._token = token;
    this._calls = new Set(); // the calls still running, which close() cancels
    this._closed = false;
  }

  /**
   * Refuses a call on a closed client as a cancelled one: grpc-js would throw a bare Error
   * ('Channel has been shut down', no status code), e.g. from a stream resumed after close().
   */
  _checkOpen() {
    if (this._closed) {
      const details = 'the client was closed';
      throw Object.assign(new Error(`${grpc.status.CANCELLED} CANCELLED: ${details}`),
        { code: grpc.status.CANCELLED, details, metadata: new grpc.Metadata() });
    }
  }

  _metadata() {
    const md = new grpc.Metadata();
    if (this._token) md.set('authorization', `Bearer ${this._token}`);
    return md;
  }

  async _unary(stub, method, requestType, request, responseType, callOptions = {}) {
    // Every public unary method is named as its RPC, in lowerCamelCase.
    checkKeys(`${method[0].toLowerCase()}${method.slice(1)}: call options`, callOptions, CALL_OPTIONS);
    const { timeoutMs, signal } = callOptions;
    this._checkOpen();
    const wire = this._codec.encode(`${PACKAGE}.${requestType}`, request);
    const deadline = deadlineIn(timeoutMs ?? this._callTimeoutMs);
    return new Promise((resolve, reject) => {
      const onAbort = () => call.cancel(); // the callback then gets a CANCELLED error
      const call = stub[method](wire, this._metadata(), deadline ? { deadline } : {}, (err, response) => {
        this._calls.delete(call);
        signal?.removeEventListener('abort', onAbort);
        if (err) reject(annotate(err));
        else resolve(this._codec.decode(`${PACKAGE}.${responseType}`, response));
      });
      this._calls.add(call);
      if (signal?.aborted) onAbort();
      else signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  _stream(method, requestType, request, responseType, { timeoutMs, signal } = {}, map) {
    this._checkOpen();
    const wire = this._codec.encode(`${PACKAGE}.${requestType}`, request);
    const deadline = deadlineIn(timeoutMs);
    const call = this._sessions[method](wire, this._metadata(), deadline ? { deadline } : {});
    this._calls.add(call);
    call.on('status', () => this._calls.delete(call));
    return new CallIterator(call, (message) => map(this._codec.decode(`${PACKAGE}.${responseType}`, message)), signal);
  }

  /**
   * Creates a session. `workspace` is a directory on the server's machine. Options:
   *
   * - model ('provider:name'), systemPrompt, maxTurns, labels;
   * - maxOutputTokens: most tokens per model response (unset or 0: 8192); lower it for a model
   *   whose output limit is smaller;
   * - permissions: the policy, `{allow, deny, ask, default, confirmationTimeout, timeoutAction}`:
   *   rule lists like `['bash(git *)', 'write(src/**)']`, actions as 'allow' | 'deny' | 'ask'
   *   (or PERMISSION_ACTION_*), the timeout in seconds; every key optional, unset allows every call;
   * - lanes: lane -> mode, e.g. `{execute: 'external'}` (modes 'internal' | 'external' | 'hybrid',
   *   or LANE_MODE_*), or lane -> `{mode, timeout}` (timeout in seconds);
   * - externalTaskTimeout: seconds an external task may take overall (unset: the server's 10 min);
   * - queue: a QueueConfig object (queryConcurrency, maxAttempts, ...); `lanes` entries are
   *   appended to its `lanes`;
   * - config: a whole SessionConfig, which the options above override.
   *
   * Resolves to the Session; an unknown option (at any depth) or a malformed permissions, lanes
   * or sandbox option rejects with a TypeError before any call.
   */
  async createSession(options = {}, callOptions) {
    checkKeys('createSession', options, CREATE_SESSION_OPTIONS);
    const {
      workspace, model, systemPrompt, maxTurns, maxOutputTokens, queue, permissions, lanes, externalTaskTimeout, sandbox, env, config, labels,
    } = options;
    const cfg = { ...(config ?? {}) };
    if (model !== undefined) cfg.model = model;
    if (systemPrompt !== undefined) cfg.systemPrompt = systemPrompt;
    if (maxTurns !== undefined) cfg.maxTurns = maxTurns;
    if (maxOutputTokens !== undefined) cfg.maxOutputTokens = maxOutputTokens;
    if (queue !== undefined) cfg.queue = queue;
    if (permissions !== undefined && permissions !== null) cfg.permissions = this._permissionPolicy(permissions);
    if (sandbox !== undefined && sandbox !== null) cfg.sandbox = this._sandboxPolicy(sandbox);
    if (env !== undefined && env !== null) cfg.env = env;
    if ((lanes !== undefined && lanes !== null) || (externalTaskTimeout !== undefined && externalTaskTimeout !== null)) {
      cfg.queue = { ...(cfg.queue ?? {}) };
      if (lanes) cfg.queue.lanes = [...(cfg.queue.lanes ?? []), ...this._laneConfigs(lanes)];
      if (externalTaskTimeout !== undefined && externalTaskTimeout !== null) {
        cfg.queue.externalTaskTimeout = externalTaskTimeout;
      }
    }
    const request = { workspace, config: Object.keys(cfg).length > 0 ? cfg : undefined, labels };
    const response = await this._unary(this._sessions, 'CreateSession', 'CreateSessionRequest', request,
      'CreateSessionResponse', callOptions);
    return response.session;
  }

  /** createSession's `permissions` -> a PermissionPolicy (proto field names are accepted too). */
  _permissionPolicy(permissions) {
    const known = ['allow', 'deny', 'ask', 'default', 'defaultAction', 'confirmationTimeout', 'timeoutAction'];
    checkKeys('permissions', permissions, known, known.filter((k) => k !== 'defaultAction'));
    const policy = {};
    for (const key of ['allow', 'deny', 'ask']) {
      const rules = permissions[key];
      if (rules === undefined || rules === null) continue;
      if (!Array.isArray(rules) || !rules.every((r) => typeof r === 'string')) {
        throw new TypeError(`permissions.${key}: expected an array of rule strings like 'bash(git *)', got ${JSON.stringify(rules)}`);
      }
      policy[key] = rules;
    }
    const action = (value, where) => this._codec.enumValue(`${PACKAGE}.PermissionAction`, 'PERMISSION_ACTION_', value, where);
    const defaultAction = permissions.default ?? permissions.defaultAction;
    if (defaultAction !== undefined && defaultAction !== null) policy.defaultAction = action(defaultAction, 'permissions.default');
    if (permissions.timeoutAction !== undefined && permissions.timeoutAction !== null) {
      policy.timeoutAction = action(permissions.timeoutAction, 'permissions.timeoutAction');
    }
    if (permissions.confirmationTimeout !== undefined && permissions.confirmationTimeout !== null) {
      policy.confirmationTimeout = permissions.confirmationTimeout;
    }
    return policy;
  }

  /**
   * createSession's `sandbox` -> a SandboxPolicy: {mode: 'workspace-write' | 'read-only' | 'off',
   * network: 'off' | 'on', maxProcesses, maxMemoryBytes, maxCpuTime (seconds), maxOpenFiles}.
   */
  _sandboxPolicy(sandbox) {
    const limitKeys = ['maxProcesses', 'maxMemoryBytes', 'maxCpuTime', 'maxOpenFiles'];
    checkKeys('sandbox', sandbox, ['mode', 'network', ...limitKeys]);
    // 'workspace-write' and 'workspace_write' are both taken; errors name the documented spelling.
    const named = (type, prefix, value, where) => this._codec.enumValue(
      `${PACKAGE}.${type}`, prefix, typeof value === 'string' ? value.replace(/-/g, '_') : value, where,
      (name) => name.replace(/_/g, '-'));
    const policy = {};
    if (sandbox.mode !== undefined && sandbox.mode !== null) {
      policy.mode = named('SandboxMode', 'SANDBOX_MODE_', sandbox.mode, 'sandbox.mode');
    }
    if (sandbox.network !== undefined && sandbox.network !== null) {
      policy.network = named('SandboxNetwork', 'SANDBOX_NETWORK_', sandbox.network, 'sandbox.network');
    }
    const limits = Object.fromEntries(limitKeys.filter((k) => sandbox[k] !== undefined && sandbox[k] !== null)
      .map((k) => [k, sandbox[k]]));
    if (Object.keys(limits).length > 0) policy.limits = limits;
    return policy;
  }

  /** createSession's `lanes` ({execute: 'external'}) -> LaneConfig objects. */
  _laneConfigs(lanes) {
    if (typeof lanes !== 'object' || Array.isArray(lanes)) {
      throw new TypeError("lanes: expected an object mapping a lane to its mode, e.g. {execute: 'external'}");
    }
    return Object.entries(lanes).map(([lane, setting]) => {
      if (typeof setting === 'object' && setting !== null) checkKeys(`lanes.${lane}`, setting, ['mode', 'timeout']);
      const { mode, timeout } = typeof setting === 'object' && setting !== null ? setting : { mode: setting };
      const out = {
        lane: this._codec.enumValue(`${PACKAGE}.Lane`, 'LANE_', lane, 'lanes key'),
        mode: this._codec.enumValue(`${PACKAGE}.LaneMode`, 'LANE_MODE_', mode, `lanes.${lane}`),
      };
      if (timeout !== undefined && timeout !== null) out.timeout = timeout;
      return out;
    });
  }

  /** Resolves to the Session; rejects with NOT_FOUND (5) for an unknown id. */
  async getSession(sessionId, callOptions) {
    const response = await this._unary(this._sessions, 'GetSession', 'GetSessionRequest', { sessionId },
      'GetSessionResponse', callOptions);
    return response.session;
  }

  /** One page of sessions, newest first: resolves to {sessions, nextPageToken} ('' on the last page). */
  async listSessions(options = {}, callOptions) {
    checkKeys('listSessions', options, ['pageSize', 'pageToken']);
    const { pageSize = 0, pageToken = '' } = options;
    return this._unary(this._sessions, 'ListSessions', 'ListSessionsRequest', { pageSize, pageToken },
      'ListSessionsResponse', callOptions);
  }

  /** Deletes a session, its history and its event log (a running turn is cancelled first). */
  async deleteSession(sessionId, callOptions) {
    await this._unary(this._sessions, 'DeleteSession', 'DeleteSessionRequest', { sessionId },
      'DeleteSessionResponse', callOptions);
  }

  /**
   * Sends a user message; returns an async iterator of the turn's events, from turn_started to
   * turn_finished (the iteration then ends). Options: {signal, timeoutMs, onResume}. If the
   * stream breaks once the turn has started (the server cut this reader for falling behind,
   * RESOURCE_EXHAUSTED; the connection was lost, UNAVAILABLE; the stream was reset), the events
   * go on from a watchEvents resumed after the last one yielded, with none missed or repeated;
   * `onResume(err, afterSequence)` hears of each resume. The turn keeps running if the
   * iteration stops early; re-attach with watchEvents.
   */
  sendMessage(sessionId, text, options = {}) {
    checkKeys('sendMessage', options, ['signal', 'timeoutMs', 'onResume']);
    const { signal, timeoutMs, onResume } = options;
    const first = this._stream('SendMessage', 'SendMessageRequest', { sessionId, text }, 'SendMessageResponse',
      { signal, timeoutMs }, (response) => response.events ?? []);
    return new ResumingIterator(first, (after) => this._watchStream(sessionId, after, true, { signal, timeoutMs }),
      { afterSequence: 0n, follow: true, turn: true, signal, onResume, closed: () => this._closed });
  }

  /**
   * Events with sequence > afterSequence (stored ones first), then a
   * {kind: 'caught_up', lastSequence} marker, then live events while `follow` is true (the
   * default, as in the Python SDK); with follow: false the iteration ends after the marker.
   * Options: {afterSequence = 0, follow = true, signal, timeoutMs, onResume}. A stream that
   * breaks is resumed after the last event yielded, as in sendMessage; the marker comes once.
   */
  watchEvents(sessionId, options = {}) {
    checkKeys('watchEvents', options, ['afterSequence', 'follow', 'signal', 'timeoutMs', 'onResume']);
    const { afterSequence = 0n, follow = true, signal, timeoutMs, onResume } = options;
    const first = this._watchStream(sessionId, afterSequence, follow, { signal, timeoutMs });
    return new ResumingIterator(first, (after) => this._watchStream(sessionId, after, follow, { signal, timeoutMs }),
      { afterSequence, follow, turn: false, signal, onResume, closed: () => this._closed });
  }

  _watchStream(sessionId, afterSequence, follow, streamOptions) {
    return this._stream('WatchEvents', 'WatchEventsRequest', { sessionId, afterSequence, follow },
      'WatchEventsResponse', streamOptions, (response) => {
        if (response.item === 'caught_up') return [{ kind: 'caught_up', lastSequence: response.caughtUp.lastSequence }];
        return response.events?.events ?? [];
      });
  }

  /** Cancels the running turn; resolves to {cancelled} (false when the session was idle). */
  async cancelTurn(sessionId, options = {}, callOptions) {
    checkKeys('cancelTurn', options, ['reason']);
    const { reason = '' } = options;
    return this._unary(this._sessions, 'CancelTurn', 'CancelTurnRequest', { sessionId, reason },
      'CancelTurnResponse', callOptions);
  }

  /** The session's whole message history, in order (every page is fetched). */
  async getMessages(sessionId, options = {}, callOptions) {
    checkKeys('getMessages', options, ['pageSize']);
    const { pageSize = 0 } = options;
    const messages = [];
    let pageToken = '';
    do {
      const page = await this._unary(this._sessions, 'GetMessages', 'GetMessagesRequest',
        { sessionId, pageSize, pageToken }, 'GetMessagesResponse', callOptions);
      messages.push(...page.messages);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return messages;
  }

  /**
   * The tools the session's model is offered now, sorted by name: each `{spec, runner, workerIds,
   * serverFallback, laneMode}`, `spec` a ToolSpec (its `parametersJsonSchema` a JSON string),
   * `runner` 'TOOL_RUNNER_SERVER', 'TOOL_RUNNER_WORKERS' or 'TOOL_RUNNER_EXTERNAL_CLIENT'.
   * Rejects with NOT_FOUND (5) for an unknown session.
   */
  async listTools(sessionId, callOptions) {
    const response = await this._unary(this._sessions, 'ListTools', 'ListToolsRequest', { sessionId },
      'ListToolsResponse', callOptions);
    return response.tools;
  }

  /**
   * Answers a confirmation_required event: `approve` true runs the call, false refuses it (the
   * call's result is then a PERMISSION_DENIED error showing `reason` to the model). Rejects with
   * NOT_FOUND (5) when no such call waits (unknown id, already answered, or timed out).
   */
  async confirmToolCall(sessionId, callId, approve, options = {}, callOptions) {
    checkKeys('confirmToolCall', options, ['reason']);
    const { reason = '' } = options;
    await this._unary(this._sessions, 'ConfirmToolCall', 'ConfirmToolCallRequest',
      { sessionId, callId, approve: Boolean(approve), reason }, 'ConfirmToolCallResponse', callOptions);
  }

  /**
   * Claims up to `maxTasks` (default 1, at most 100) pending external tasks of a session, each
   * leased to `clientId` for `leaseSeconds` (default 30). With `waitSeconds` (at most 60) it
   * long-polls: waits that long for a task when none is pending. Resolves to the claimed
   * ExternalTask objects (possibly none): {taskId, sessionId, call: {callId, toolName,
   * argumentsJson, lane, index}, lane, attempt (a Number: int32), leaseExpireTime (Date),
   * deadline (Date), workspace}. Its default deadline is `callTimeoutMs` plus the wait.
   */
  async claimExternalTasks(sessionId, options = {}, callOptions = {}) {
    checkKeys('claimExternalTasks', options, ['clientId', 'maxTasks', 'leaseSeconds', 'waitSeconds']);
    const { clientId, maxTasks = 1, leaseSeconds = 30, waitSeconds = 0 } = options;
    const request = { sessionId, clientId, maxTasks, lease: leaseSeconds };
    if (waitSeconds > 0) request.wait = waitSeconds;
    const timeoutMs = callOptions.timeoutMs
      ?? (this._callTimeoutMs ? this._callTimeoutMs + Math.max(0, waitSeconds) * 1000 : 0);
    const response = await this._unary(this._sessions, 'ClaimExternalTasks', 'ClaimExternalTasksRequest', request,
      'ClaimExternalTasksResponse', { ...callOptions, timeoutMs });
    return response.tasks;
  }

  /**
   * Completes a claimed external task with its result, a ToolResult object: {output, isError,
   * exitCode, truncated, errorKind ('tool_error' or ERROR_KIND_*; an error without one is a
   * TOOL_ERROR), metadataJson, runTime (seconds)}. Rejects with FAILED_PRECONDITION (9) when
   * `clientId` does not hold the task's lease (never claimed, expired, or another client's), and
   * NOT_FOUND (5) when the task is gone (completed, timed out, or its turn was cancelled).
   */
  async completeExternalTask(sessionId, taskId, clientId, result = {}, callOptions) {
    await this._unary(this._sessions, 'CompleteExternalTask', 'CompleteExternalTaskRequest',
      { sessionId, taskId, clientId, result: this._toolResult(result) }, 'CompleteExternalTaskResponse', callOptions);
  }

  /**
   * Extends `clientId`'s lease of a claimed task: it now ends `leaseSeconds` (default 30) from
   * now. Resolves to the ExternalTask with its new leaseExpireTime. Rejects like
   * completeExternalTask (FAILED_PRECONDITION when the lease is not this client's, NOT_FOUND
   * when the task is gone). runExternalTasks renews the leases of the tasks it runs.
   */
  async renewExternalTaskLease(sessionId, taskId, clientId, options = {}, callOptions) {
    checkKeys('renewExternalTaskLease', options, ['leaseSeconds']);
    const { leaseSeconds = 30 } = options;
    const response = await this._unary(this._sessions, 'RenewExternalTaskLease', 'RenewExternalTaskLeaseRequest',
      { sessionId, taskId, clientId, lease: leaseSeconds }, 'RenewExternalTaskLeaseResponse', callOptions);
    return response.task;
  }

  _toolResult(result) {
    if (typeof result !== 'object' || result === null || Array.isArray(result)) {
      throw new TypeError(`result: expected a ToolResult object {output, isError, ...}, got ${String(result)}`);
    }
    // Checked here, not only when the request is encoded, so that a handler of runExternalTasks
    // returning a misspelt field completes its task with an error rather than ending the loop.
    checkKeys('result', result, this._codec.descriptor(`${PACKAGE}.ToolResult`).field.map((f) => f.name));
    const out = { ...result };
    if (out.errorKind === undefined || out.errorKind === null || out.errorKind === '') delete out.errorKind;
    else out.errorKind = this._codec.enumValue(`${PACKAGE}.ErrorKind`, 'ERROR_KIND_', out.errorKind, 'result.errorKind');
    return out;
  }

  /**
   * Serves a session's external tasks until `signal` aborts: claims with a long-poll of
   * `waitSeconds` (default 20), runs `await handler(task, {signal})` for each claimed task (up to
   * `maxTasks` at once, default 1) and completes the task with the result the handler returns (a
   * ToolResult object as for completeExternalTask, or a string taken as the output; runTime
   * defaults to the handler's duration). A handler that throws completes its task with an error
   * result (isError true, ERROR_KIND_TOOL_ERROR) saying what was thrown.
   *
   * Aborting the signal cancels a pending claim at once; tasks already claimed are still run
   * and completed, then the promise resolves to the number of tasks this loop completed. While
   * a handler runs, its task's lease (`leaseSeconds`, default 30) is renewed every half lease,
   * so a handler may run as long as the task's deadline allows; the lease is how soon another
   * client gets the task if this one dies. When a renewal finds the task gone (it timed out,
   * its turn was cancelled, or the lease was lost: FAILED_PRECONDITION, NOT_FOUND), the
   * handler's `signal` aborts (it is also aborted with the loop's), the loop stops waiting for
   * it and goes on claiming; its result would be refused. A result refused all the same is
   * skipped and the loop goes on.
   * `onError(err, task)`, if given, hears of handler exceptions, failed renewals and refused
   * results. Other errors (server gone, session deleted, bad arguments) reject the promise.
   */
  async runExternalTasks(sessionId, clientId, handler, options = {}) {
    checkKeys('runExternalTasks', options, ['signal', 'maxTasks', 'leaseSeconds', 'waitSeconds', 'onError']);
    const { signal, maxTasks = 1, leaseSeconds = 30, waitSeconds = 20, onError } = options;
    if (typeof handler !== 'function') throw new TypeError('runExternalTasks: handler must be a function');
    let completed = 0;
    while (!signal?.aborted) {
      let tasks;
      try {
        tasks = await this.claimExternalTasks(sessionId, { clientId, maxTasks, leaseSeconds, waitSeconds }, { signal });
      } catch (err) {
        if (signal?.aborted && err?.code === grpc.status.CANCELLED) break;
        throw err;
      }
      const outcomes = await Promise.allSettled(
        tasks.map((task) => this._serveExternalTask(sessionId, clientId, handler, task,
          { signal, leaseSeconds, onError })));
      const failure = outcomes.find((o) => o.status === 'rejected');
      if (failure) throw failure.reason;
      completed += outcomes.filter((o) => o.value).length;
    }
    return completed;
  }

  async _serveExternalTask(sessionId, clientId, handler, task, { signal, leaseSeconds, onError }) {
    const started = performance.now();
    // Aborted when the task is gone: a handler that ran on to its end held one of maxTasks (with
    // the default of 1, every task after it timed out unclaimed).
    const gone = new AbortController();
    const taskSignal = signal ? AbortSignal.any([signal, gone.signal]) : gone.signal;
    const stopRenewing = this._keepLease(sessionId, clientId, task, leaseSeconds, onError, () => gone.abort());
    const goneWhile = new Promise((resolve) => {
      gone.signal.addEventListener('abort', () => resolve(GONE), { once: true });
    });
    let result;
    try {
      const returned = await Promise.race([handler(task, { signal: taskSignal }), goneWhile]);
      if (returned === GONE) return false;
      if (typeof returned === 'string') result = { output: returned };
      else if (typeof returned === 'object' && returned !== null && !Array.isArray(returned)) result = { ...returned };
      else throw new TypeError(`the handler returned ${String(returned)}, not a ToolResult object or a string`);
      this._toolResult(result); // a bad errorKind is the handler's error too
    } catch (err) {
      report(onError, err, task);
      const what = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
      result = {
        output: `${task.call.toolName} failed in client ${clientId}: ${what}`,
        isError: true,
        errorKind: 'ERROR_KIND_TOOL_ERROR',
      };
    } finally {
      stopRenewing();
    }
    result.runTime ??= (performance.now() - started) / 1000;
    try {
      await this.completeExternalTask(sessionId, task.taskId, clientId, result);
    } catch (err) {
      if (err?.code !== grpc.status.FAILED_PRECONDITION && err?.code !== grpc.status.NOT_FOUND) throw err;
      report(onError, err, task);
      return false;
    }
    return true;
  }

  /**
   * Renews a task's lease every half lease until the returned function is called; calls
   * `onGone` when the task is gone (the lease lost, the task timed out or withdrawn).
   */
  _keepLease(sessionId, clientId, task, leaseSeconds, onError, onGone) {
    let stopped = false;
    let timer;
    const renew = async () => {
      try {
        await this.renewExternalTaskLease(sessionId, task.taskId, clientId, { leaseSeconds });
      } catch (err) {
        if (stopped) return; // the handler is done: the task may well be gone by now
        report(onError, err, task);
        // The lease is lost: the result will be refused. Anything else (the server unreachable
        // for a moment) may pass before the lease runs out, so keep trying.
        if (err?.code === grpc.status.FAILED_PRECONDITION || err?.code === grpc.status.NOT_FOUND) {
          onGone();
          return;
        }
      }
      if (!stopped) timer = setTimeout(renew, leaseSeconds * 500);
    };
    timer = setTimeout(renew, leaseSeconds * 500);
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }

  /** Every connected worker (WorkerInfo objects), by id (every page is fetched). */
  async listWorkers(callOptions) {
    const workers = [];
    let pageToken = '';
    do {
      const page = await this._unary(this._admin, 'ListWorkers', 'ListWorkersRequest', { pageToken },
        'ListWorkersResponse', callOptions);
      workers.push(...page.workers);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return workers;
  }

  /** Asks a worker to drain; resolves to the WorkerInfo as it is now. */
  async drainWorker(workerId, options = {}, callOptions) {
    checkKeys('drainWorker', options, ['reason']);
    const { reason = '' } = options;
    const response = await this._unary(this._admin, 'DrainWorker', 'DrainWorkerRequest', { workerId, reason },
      'DrainWorkerResponse', callOptions);
    return response.worker;
  }

  /** Per-lane counters and latencies: {lanes, workers, workerSlots, workerInFlight}. */
  getQueueStats(callOptions) {
    return this._unary(this._admin, 'GetQueueStats', 'GetQueueStatsRequest', {}, 'GetQueueStatsResponse',
      callOptions);
  }

  /** The server's version and start time: {version, startTime (a Date)}. */
  getServerInfo(callOptions) {
    return this._unary(this._admin, 'GetServerInfo', 'GetServerInfoRequest', {}, 'GetServerInfoResponse',
      callOptions);
  }

  /** Closes the channel; the calls and streams still running end with CANCELLED. */
  close() {
    // grpc-js lets the calls of a closed channel run on: a following watch would never end, a
    // claim would wait its whole long-poll, and either would keep the process alive. Cancelled
    // here, a stream throws CANCELLED and a call rejects with it.
    this._closed = true;
    for (const call of this._calls) call.cancel();
    this._calls.clear();
    this._sessions.close();
    this._admin.close();
  }
}

/**
 * The server address named by the environment, as the CLI reads it: $CODELANE_SERVER, else
 * DEFAULT_ADDRESS. $CODELANE_ADDRESS, the name earlier examples used, still works, with a
 * deprecation warning on stderr.
 */
export function serverFromEnv(env = process.env) {
  if (env.CODELANE_SERVER) return env.CODELANE_SERVER;
  if (env.CODELANE_ADDRESS) {
    process.emitWarning('$CODELANE_ADDRESS is deprecated: set $CODELANE_SERVER', 'DeprecationWarning');
    return env.CODELANE_ADDRESS;
  }
  return DEFAULT_ADDRESS;
}

/**
 * The server address an example was given: `server` (its --server), else `address` (the
 * deprecated --address), else the environment (serverFromEnv), checked by parseAddress. A bad one
 * is a TypeError that names where it came from, e.g. "--server: '127.0.0.1' has no port: ...".
 */
export function serverAddress({ server, address } = {}, env = process.env) {
  const from = server !== undefined ? '--server'
    : address !== undefined ? '--address'
      : env.CODELANE_SERVER ? '$CODELANE_SERVER' : '$CODELANE_ADDRESS';
  try {
    return parseAddress(server ?? address ?? serverFromEnv(env));
  } catch (err) {
    throw new TypeError(`${from}: ${err.message}`);
  }
}

/** A JSON.stringify replacer that writes BigInts as decimal strings. */
export function jsonReplacer(_key, value) {
  return typeof value === 'bigint' ? value.toString() : value;
}
