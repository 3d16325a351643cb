#!/usr/bin/env node
// Runs one codelane turn with a permission policy that asks before some calls, and with the
// Execute lane (bash, write, edit, ...) in EXTERNAL mode: this process claims those calls as
// external tasks and completes them itself.
//
// Usage:
//   node examples/confirm_and_external.js WORKSPACE [PROMPT] [--ask RULE]... [--reject]
//        [--server HOST:PORT] [--token TOKEN] [--model MODEL]
//
//   WORKSPACE   a directory on the server's machine (the session's workspace)
//   PROMPT      the user message (default: "Fix the greeting.")
//   --ask       a permission rule whose calls wait for a confirmation, e.g. 'edit' or 'bash(git *)'
//               (repeatable; default: edit)
//   --reject    reject the confirmations instead of approving them
//   --server    server address, HOST:PORT (default: $CODELANE_SERVER or 127.0.0.1:50051;
//               --address and $CODELANE_ADDRESS, the old names, still work)
//   --token     bearer token, if the server was started with --token (default: $CODELANE_TOKEN)
//   --model     model as provider:name (default: the server's default model)
//
// Example, with a scripted model (from the repository root):
//   python -m codelane.cli server --listen 127.0.0.1:50051 --local-workers 1 \
//       --model scripted:session_server/demo/script.yaml &
//   cp -r session_server/demo/workspace /tmp/demo-ws
//   node clients/node/examples/confirm_and_external.js /tmp/demo-ws
//
// The external-task handler here is a dry run: it prints each call and answers with a result
// saying it was not executed, so nothing in the workspace changes. A real client would run the
// call in its own environment (a sandbox, a remote machine) and return its output.

import path from 'node:path';
import { parseArgs } from 'node:util';

import { connect, serverAddress } from '../src/client.js';

const USAGE = 'usage: node examples/confirm_and_external.js WORKSPACE [PROMPT] [--ask RULE]... [--reject] '
  + '[--server HOST:PORT] [--token TOKEN] [--model MODEL]';
const CLIENT_ID = `node-example-${process.pid}`;

async function dryRun(task) {
  const { toolName, argumentsJson } = task.call;
  console.log(`  [external] ${task.taskId} (attempt ${task.attempt}) ${toolName} ${argumentsJson}`);
  return { output: `dry run: ${toolName} was not executed by ${CLIENT_ID}`, exitCode: toolName === 'bash' ? 0 : undefined };
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      ask: { type: 'string', multiple: true },
      reject: { type: 'boolean', default: false },
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
    console.error(`confirm_and_external.js: ${err.message}\n${USAGE}`);
    process.exit(2);
  }
  const workspace = path.resolve(positionals[0]);
  const prompt = positionals[1] ?? 'Fix the greeting.';
  const approve = !values.reject;

  if (values.address) console.error('--address is deprecated: use --server');
  const client = connect(server, { token: values.token });
  const stop = new AbortController();
  let runner;
  try {
    const session = await client.createSession({
      workspace,
      model: values.model,
      permissions: { ask: values.ask ?? ['edit'], confirmationTimeout: 30 },
      lanes: { execute: 'external' },
      externalTaskTimeout: 60,
    });
    console.log(`session ${session.sessionId}: asks for ${session.config.permissions.ask.join(', ')}; `
      + 'Execute lane external');

    // Serve the session's external tasks while the turn runs (long-polling claims).
    runner = client.runExternalTasks(session.sessionId, CLIENT_ID, dryRun, {
      signal: stop.signal,
      waitSeconds: 10,
      onError: (err, task) => console.error(`  [external] ${task.taskId}: ${err.details ?? err.message}`),
    });
    runner.catch(() => {}); // a failure is reported by the `await runner` below

    for await (const ev of client.sendMessage(session.sessionId, prompt)) {
      switch (ev.kind) {
        case 'confirmation_required': {
          const { call } = ev.confirmationRequired;
          console.log(`#${ev.sequence} confirm ${call.toolName} ${call.argumentsJson}? ${approve ? 'yes' : 'no'}`);
          await client.confirmToolCall(session.sessionId, call.callId, approve,
            { reason: approve ? '' : 'rejected by the example (--reject)' });
          break;
        }
        case 'tool_call_finished': {
          const { toolName, result } = ev.toolCallFinished;
          const status = result.isError ? `ERROR ${result.errorKind}` : 'ok';
          console.log(`#${ev.sequence} ${toolName} ${status} (worker ${result.workerId || '-'}): `
            + `${JSON.stringify(result.output.slice(0, 80))}`);
          break;
        }
        case 'turn_finished':
          console.log(`#${ev.sequence} ${ev.turnFinished.stopReason}: ${JSON.stringify(ev.turnFinished.finalText)}`);
          break;
        default:
          break;
      }
    }
  } finally {
    stop.abort();
    if (runner) console.log(`external tasks completed by ${CLIENT_ID}: ${await runner}`);
    client.close();
  }
}

main().catch((err) => {
  const code = err.code !== undefined ? ` (gRPC code ${err.code})` : '';
  console.error(`error${code}: ${err.details ?? err.message}`);
  process.exit(1);
});
