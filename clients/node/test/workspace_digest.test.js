// The workspace digest computed by an independent implementation (src/workspace_digest.js,
// written from the comments of protos/codelane/v1/workspace.proto) equals the server's
// (`python -m tool_worker.merkle`, python from $CODELANE_PYTHON) on trees with empty
// directories, symlinks, unicode names, executable bits, exclusions and names left out.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';

import { workspaceDigest } from '../src/workspace_digest.js';

const PYTHON = process.env.CODELANE_PYTHON || 'python3';
const roots = [];
after(() => roots.forEach((root) => fs.rmSync(root, { recursive: true, force: true })));

function tree(build) {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'codelane-digest-'));
  roots.push(root);
  build(root);
  return root;
}

function serverDigest(root, excludes) {
  const args = ['-m', 'tool_worker.merkle', root, ...(excludes ?? []).flatMap((p) => ['--exclude', p])];
  if (excludes && excludes.length === 0) args.push('--exclude', '__no_such_path_at_all__');
  return JSON.parse(execFileSync(PYTHON, args, { encoding: 'utf8' }));
}

const write = (root, relative, content = '', mode = 0o644) => {
  fs.mkdirSync(path.dirname(path.join(root, relative)), { recursive: true });
  fs.writeFileSync(path.join(root, relative), content, { mode });
  fs.chmodSync(path.join(root, relative), mode);
};

const cases = {
  'an empty tree': () => {},
  'empty directories, nested': (root) => {
    fs.mkdirSync(path.join(root, 'a/b/c'), { recursive: true });
    fs.mkdirSync(path.join(root, 'z'));
  },
  'files, an empty file and executable bits': (root) => {
    write(root, 'run.sh', '#!/bin/sh\necho hi\n', 0o755);
    write(root, 'empty');
    write(root, 'src/main.py', 'print("hi")\n');
    write(root, 'src/tool', 'x', 0o700);
  },
  'symlinks, dangling and absolute ones too': (root) => {
    write(root, 'target.txt', 'pointed at\n');
    fs.symlinkSync('target.txt', path.join(root, 'link'));
    fs.symlinkSync('no/such/file', path.join(root, 'dangling'));
    fs.symlinkSync('/etc/hostname', path.join(root, 'absolute'));
    fs.mkdirSync(path.join(root, 'dir'));
    fs.symlinkSync('../dir', path.join(root, 'dir/up'));
  },
  'unicode names, sorted as UTF-8 bytes': (root) => {
    for (const name of ['é.txt', 'e.txt', 'Z.txt', '日本語.md', 'emoji-😀', 'ａ', 'a b']) write(root, name, name);
    fs.mkdirSync(path.join(root, 'ünï cödé'));
    write(root, 'ünï cödé/ß', 'sharp s');
  },
  'exclusions and names left out': (root) => {
    write(root, '.git/HEAD', 'ref: refs/heads/main\n');
    write(root, '.git/objects/ab/cdef', 'an object');
    write(root, '.codelane/codelane.db', 'data');
    write(root, 'keep.txt', 'kept');
    fs.writeFileSync(Buffer.concat([Buffer.from(`${root}/`), Buffer.from([0x62, 0x61, 0x64, 0xff])]), 'bad name');
    execFileSync('mkfifo', [path.join(root, 'pipe')]);
  },
  'old and big modification times': (root) => {
    write(root, 'old.txt', 'old');
    fs.utimesSync(path.join(root, 'old.txt'), 1, 1);
    write(root, 'future.txt', 'future');
    fs.utimesSync(path.join(root, 'future.txt'), 4102444800, 4102444800);
  },
};

for (const [name, build] of Object.entries(cases)) {
  test(`the digest of ${name} equals the server's`, () => {
    const root = tree(build);
    const ours = workspaceDigest(root);
    const theirs = serverDigest(root);
    assert.equal(ours.hash, theirs.hash);
    assert.equal(ours.sizeBytes, theirs.size_bytes);
    assert.equal(ours.timesHash, theirs.times_hash);
    assert.equal(ours.skipped.length, theirs.skipped.length);
  });
}

test('custom exclusion patterns give the same digest on both sides', () => {
  const root = tree((r) => {
    write(r, 'node_modules/x/index.js', 'x');
    write(r, 'web/node_modules/y.js', 'y');
    write(r, 'build/a.o', 'o');
    write(r, 'build/sub/b.o', 'o');
    write(r, 'src/a.c', 'c');
  });
  for (const excludes of [['**/node_modules', 'build/*.o'], ['src/**'], ['?uild/**', '*/*/y.js'], []]) {
    const ours = workspaceDigest(root, excludes);
    const theirs = serverDigest(root, excludes);
    assert.equal(ours.hash, theirs.hash, JSON.stringify(excludes));
  }
  assert.notEqual(workspaceDigest(root, ['src/**']).hash, workspaceDigest(root, []).hash);
});
