#!/usr/bin/env node
// Runs one codelane session turn and then resumes its event stream from the middle.
//
// Usage:
//   node examples/run_session.js WORKSPACE [PROMPT] [--server HOST:PORT] [--token TOKEN] [--model MODEL]
//
//   WORKSPACE   a directory on the server's machine (the session's workspace)
//   PROMPT      the user message (default: "Look around this project and summarize it.")
//   --server    server address, HOST:PORT (default: $CODELANE_SERVER or 127.0.0.1:50051;
//               --address and $CODELANE_ADDRESS, the old names, still work)
//   --token     bearer token, if the server was started with --token (default: $CODELANE_TOKEN)
//   --model     model as provider:name (default: the server's default model)
//
// Example, with a scripted model (from the repository root):
//   python -m codelane.cli server --listen 127.0.0.1:50051 --local-workers 1 \
//       --model scripted:session_server/demo/script.yaml &
//   cp -r session_server/demo/workspace /tmp/demo-ws
//   node clients/node/examples/run_session.js /tmp/demo-ws
//
// It creates a session, streams the turn's events (kind, sequence, tool names and workers),
// then opens WatchEvents after a sequence from the middle of the turn and prints the rest of the
// log up to the caught_up marker, and exits (status 1 on an error).

import path from 'node:path';
import { parseArgs } from 'node:util';

import { connect, serverAddress } from '../src/client.js';

const USAGE = 'usage: node examples/run_session.js WORKSPACE [PROMPT] [--server HOST:PORT] [--token TOKEN] [--model MODEL]';

function describe(ev) {
  switch (ev.kind) {
    case 'turn_started':
      return `user: ${JSON.stringify(ev.turnStarted.userText)}`;
    case 'text_delta':
      return `text: ${JSON.stringify(ev.textDelta.text)}`;
    case 'model_responded':
      return `step ${ev.modelResponded.step}: ${ev.modelResponded.toolCalls.map((c) => c.toolName).join(', ') || 'no tool calls'}`;
    case 'tool_call_started': {
      const { call, workerId, lane, attempt } = ev.toolCallStarted;
      return `${call.toolName} ${call.callId} on ${workerId} (${lane}, attempt ${attempt}) ${call.argumentsJson}`;
    }
    case 'tool_call_finished': {
      const { toolName, callId, result } = ev.toolCallFinished;
      const status = result.isError ? `ERROR ${result.errorKind}` : 'ok';
      return `${toolName} ${callId} ${status} on ${result.workerId} in ${(result.runTime * 1000).toFixed(1)} ms`;
    }
    case 'call_retried':
      return `${ev.callRetried.callId} retried (attempt ${ev.callRetried.attempt}): ${ev.callRetried.reason}`;
    case 'worker_lost':
      return `worker ${ev.workerLost.workerId} lost: ${ev.workerLost.reason}`;
    case 'error':
      return `${ev.error.reason}: ${ev.error.message}`;
    case 'turn_finished': {
      const t = ev.turnFinished;
      return `${t.stopReason}, ${t.modelRequests} model requests, ${t.toolCalls} tool calls: ${JSON.stringify(t.finalText)}`;
    }
    default:
      return '';
  }
}

function print(ev) {
  if (ev.kind === 'caught_up') {
    console.log(`  [caught_up] last sequence ${ev.lastSequence}`);
    return;
  }
  console.log(`  #${String(ev.sequence).padStart(3)} ${ev.kind.padEnd(18)} ${describe(ev)}`);
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      server: { type: 'string' },
      address: { type: 'string' }, // the old name of --server
      token: { type: 'string', default: process.env.CODELANE_TOKEN },
      model: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || positionals.length < 1 || positionals.length > 2) {
    console.error(USAGE);
    process.exit(values.help ? 0 : 2);
  }
  // A bad address is a usage error, as in the CLI, rather than a refused connection to port 443.
  let server;
  try {
    server = serverAddress({ server: values.server, address: values.address });
  } catch (err) {
    console.error(`run_session.js: ${err.message}\n${USAGE}`);
    process.exit(2);
  }
  const workspace = path.resolve(positionals[0]);
  const prompt = positionals[1] ?? 'Look around this project and summarize it.';

  if (values.address) console.error('--address is deprecated: use --server');
  const client = connect(server, { token: values.token });
  try {
    const session = await client.createSession({ workspace, model: values.model });
    console.log(`session ${session.sessionId} on ${session.workspace} (${session.config.model})`);

    console.log('turn:');
    let last = 0n;
    for await (const ev of client.sendMessage(session.sessionId, prompt)) {
      print(ev);
      last = ev.sequence;
    }

    const middle = last / 2n; // BigInt arithmetic: exact for any int64
    console.log(`resumed with watchEvents(afterSequence = ${middle}):`);
    for await (const item of client.watchEvents(session.sessionId, { afterSequence: middle, follow: false })) {
      print(item);
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const code = err.code !== undefined ? ` (gRPC code ${err.code})` : '';
  console.error(`error${code}: ${err.details ?? err.message}`);
  process.exit(1);
});
