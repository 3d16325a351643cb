// The conformance kits (python from $CODELANE_PYTHON, default "python3"): the example tool worker
// (examples/worker/word_count_worker.js) against `codelane conformance worker` (a real hub), and
// this client's scenario (examples/conformance_client.js) against `codelane conformance client` (a
// real, scripted server). Both must pass every check.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';

import { runWordCount, wordCount } from '../examples/worker/word_count_worker.js';

const PYTHON = process.env.CODELANE_PYTHON || 'python3';
const WORKER = fileURLToPath(new URL('../examples/worker/word_count_worker.js', import.meta.url));
const CLIENT_SCENARIO = fileURLToPath(new URL('../examples/conformance_client.js', import.meta.url));
const KIT_TIMEOUT_MS = 90_000;

describe('word_count', () => {
  test('counts lines, words and characters as wc does', () => {
    assert.deepEqual(wordCount('the quick brown fox\njumps over\n'), { lines: 2, words: 6, characters: 31 });
    assert.deepEqual(wordCount(''), { lines: 0, words: 0, characters: 0 });
    // Characters are code points: an emoji is one, not two UTF-16 units.
    assert.deepEqual(wordCount('a 😀'), { lines: 0, words: 2, characters: 3 });
  });

  test('answers "LINES WORDS CHARACTERS" and refuses arguments it cannot use', () => {
    assert.equal(runWordCount('{"text": "one two\\n"}').output, '1 2 8');
    for (const bad of ['{"text": ', '[1]', '{}', '{"text": 3}', '{"text": "x", "extra": 1}']) {
      const result = runWordCount(bad);
      assert.equal(result.isError, true, bad);
      assert.equal(result.errorKind, 'ERROR_KIND_INVALID_ARGUMENTS', bad);
    }
  });
});

/** Runs `codelane conformance KIND ARGS...`; resolves to {code, out, lines} (lines: the PASS/FAIL/SKIP
 * ones). The kit keeps its logs for the user; here they go in a directory removed afterwards. */
async function conformance(kind, args) {
  const logs = mkdtempSync(join(tmpdir(), 'codelane-node-kit-'));
  try {
    return await runKit(['conformance', kind, '--logs', logs, ...args]);
  } finally {
    rmSync(logs, { recursive: true, force: true });
  }
}

async function runKit(args) {
  const child = spawn(PYTHON, ['-m', 'codelane.cli', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (chunk) => { out += chunk; });
  child.stderr.on('data', (chunk) => { out += chunk; });
  const code = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`the kit did not finish within ${KIT_TIMEOUT_MS} ms:\n${out}`));
    }, KIT_TIMEOUT_MS);
    child.on('error', (error) => reject(new Error(`cannot start ${PYTHON}: ${error.message}`)));
    child.on('exit', (status) => {
      clearTimeout(timer);
      resolve(status);
    });
  });
  return { code, out, lines: out.split('\n').filter((line) => /^(PASS|FAIL|SKIP) /.test(line)) };
}

describe('conformance', { timeout: 2 * KIT_TIMEOUT_MS + 10_000 }, () => {
  test('the worker passes every check of codelane conformance worker', async () => {
    const { code, out, lines } = await conformance('worker', ['--within', '10', '--',
      process.execPath, WORKER, '--connect', '{hub}', '--slots', '2']);
    assert.equal(code, 0, out);
    assert.equal(lines.length, 10, out);
    // Its tool reads no workspace files: it reports no Holdings, which the kit notes as a SKIP.
    assert.ok(lines.every((line) => line.startsWith('PASS ') || line.startsWith('SKIP content-sync:')), out);
    assert.ok(lines.some((line) => line.startsWith('SKIP content-sync:')), out);
    assert.match(out, /PASS assign: answered with success .*: 0 1 15/);
  });

  test('this client passes every check of codelane conformance client', async () => {
    const { code, out, lines } = await conformance('client', ['--', process.execPath, CLIENT_SCENARIO]);
    assert.equal(code, 0, out);
    assert.deepEqual(lines.map((line) => line.split(':')[0]),
      ['PASS exit', 'PASS session', 'PASS turn', 'PASS resume', 'PASS errors']);
  });
});
