// Followers through the Node client's watchEvents (which resumes on its own), for
// tests/session/test_resume_across_restarts.py. Usage: node followers.mjs ADDRESS PER_SESSION SID...
// Prints "watching" once every follower has its caught_up marker; then reads "SID SEQUENCE" lines
// (the session's last sequence) and, once every follower reached its session's, prints one JSON
// line: {sid: [[sequence, kind, turnId, stopReason], ...] per follower} and exits.
import readline from 'node:readline';
import { pathToFileURL } from 'node:url';
import path from 'node:path';

const [address, perSession, ...sessions] = process.argv.slice(2);
const here = path.dirname(new URL(import.meta.url).pathname);
const { connect } = await import(pathToFileURL(path.join(here, '../../../clients/node/src/client.js')).href);
const client = connect(address);
const ends = new Map();
const followers = [];
let watching = 0;
const total = sessions.length * Number(perSession);
const waiters = [];
const settle = () => { for (const w of waiters.splice(0)) w(); };

for (const sid of sessions) {
  for (let i = 0; i < Number(perSession); i++) {
    const follower = { sid, events: [], caughtUps: 0, error: null, resumes: [] };
    followers.push(follower);
    follower.done = (async () => {
      const abort = new AbortController();
      follower.abort = abort;
      try {
        for await (const item of client.watchEvents(sid, { signal: abort.signal, onResume: (err, after) => { follower.resumes.push(`${err.code}:${err.details}@${after}`); } })) {
          if (item.kind === 'caught_up') {
            follower.caughtUps += 1;
            if (follower.caughtUps === 1 && ++watching === total) console.log('watching');
            continue;
          }
          follower.events.push([Number(item.sequence), item.kind, item.turnId,
            item.turnFinished ? item.turnFinished.stopReason : null]);
          settle();
        }
      } catch (err) {
        if (!abort.signal.aborted) { follower.error = `${err} after ${follower.events.length} events, ${follower.caughtUps} caught_up, resumes: ${follower.resumes}`; settle(); }
      }
    })();
  }
}

const reached = (f) => f.error !== null || (ends.has(f.sid) && f.events.length > 0 && f.events.at(-1)[0] >= ends.get(f.sid));
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const [sid, sequence] = line.trim().split(/\s+/);
  ends.set(sid, Number(sequence));
  settle();
});
while (!followers.every(reached)) await new Promise((resolve) => waiters.push(resolve));
for (const f of followers) f.abort.abort();
client.close();
// Written before exiting: a pipe takes big writes asynchronously.
process.stdout.write(`${JSON.stringify(followers.map((f) => ({ sid: f.sid, events: f.events, caughtUps: f.caughtUps, error: f.error })))}\n`, () => process.exit(0));
