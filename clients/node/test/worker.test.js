// The example tool worker (examples/worker/word_count_worker.js): its tool, and the whole worker
// against `codelane conformance worker` (a real hub, python from $CODELANE_PYTHON, default
// "python3"), which must pass every check.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';

import { runWordCount, wordCount } from '../examples/worker/word_count_worker.js';

const PYTHON = process.env.CODELANE_PYTHON || 'python3';
const WORKER = fileURLToPath(new URL('../examples/worker/word_count_worker.js', import.meta.url));
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

describe('the worker', { timeout: KIT_TIMEOUT_MS + 10_000 }, () => {
  test('passes every check of codelane conformance worker', async () => {
    const args = ['-m', 'codelane.cli', 'conformance', 'worker', '--within', '10', '--',
      process.execPath, WORKER, '--connect', '{hub}', '--slots', '2'];
    const child = spawn(PYTHON, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (chunk) => { out += chunk; });
    child.stderr.on('data', (chunk) => { err += chunk; });
    const code = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`the kit did not finish within ${KIT_TIMEOUT_MS} ms:\n${out}${err}`));
      }, KIT_TIMEOUT_MS);
      child.on('error', (error) => reject(new Error(`cannot start ${PYTHON}: ${error.message}`)));
      child.on('exit', (status) => {
        clearTimeout(timer);
        resolve(status);
      });
    });
    assert.equal(code, 0, `${out}${err}`);
    const lines = out.split('\n').filter((line) => /^(PASS|FAIL|SKIP) /.test(line));
    assert.equal(lines.length, 10, out);
    assert.ok(lines.every((line) => line.startsWith('PASS ')), out);
    assert.match(out, /PASS assign: answered with success .*: 0 1 15/);
  });
});
