// The client conformance scenario (docs/protocol.md, "Conformance kits", `codelane conformance
// client`) played with this Node client:
//
//   codelane conformance client -- node clients/node/examples/conformance_client.js

import { connect, grpc } from '../src/client.js';

const client = connect(process.env.CODELANE_SERVER);
const failure = (err) => `error ${grpc.status[err.code]} ${err.errorInfo?.reason ?? ''}`;
try {
  const session = await client.createSession({ workspace: process.env.CODELANE_CONFORMANCE_WORKSPACE });
  console.log('session', session.sessionId);
  for await (const ev of client.sendMessage(session.sessionId, 'hello')) console.log('turn', String(ev.sequence), ev.kind);
  for await (const item of client.watchEvents(session.sessionId, { afterSequence: 2n, follow: false })) {
    if (item.kind === 'caught_up') console.log('caught_up', String(item.lastSequence));
    else console.log('replay', String(item.sequence), item.kind);
  }
  try {
    for await (const _ of client.watchEvents(session.sessionId, { afterSequence: 1_000_000n, follow: false })) {
      // nothing: the server refuses a sequence beyond the log's end
    }
  } catch (err) {
    console.log(failure(err));
  }
  try {
    await client.getSession('missing');
  } catch (err) {
    console.log(failure(err));
  }
} finally {
  client.close();
}
