// The codelane workspace digest (REAPI v2 Merkle tree, SHA-256), written from the spec in
// protos/codelane/v1/workspace.proto alone: a second implementation that the tests compare with
// the server's. Node's standard library only.
//
//   import { workspaceDigest } from './workspace_digest.js';
//   const { hash, sizeBytes, timesHash, skipped } = workspaceDigest('/path/to/tree');

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

export const DEFAULT_EXCLUDES = ['.git/objects/**', '.codelane/**'];

const utf8 = new TextDecoder('utf-8', { fatal: true });

function varint(value) {
  let n = BigInt.asUintN(64, BigInt(value));
  const out = [];
  while (n >= 0x80n) {
    out.push(Number((n & 0x7fn) | 0x80n));
    n >>= 7n;
  }
  out.push(Number(n));
  return Buffer.from(out);
}

// A length-delimited record (wire type 2).
function record(field, payload) {
  return Buffer.concat([varint((field << 3) | 2), varint(payload.length), payload]);
}

// A varint record (wire type 0), left out when it holds the default 0.
function number(field, value) {
  return BigInt(value) === 0n ? Buffer.alloc(0) : Buffer.concat([varint(field << 3), varint(value)]);
}

function text(field, value) {
  return value === '' ? Buffer.alloc(0) : record(field, Buffer.from(value, 'utf8'));
}

function digestOf(bytes) {
  return { hash: crypto.createHash('sha256').update(bytes).digest('hex'), size: bytes.length };
}

function encodeDigest(d) {
  return Buffer.concat([text(1, d.hash), number(2, d.size)]);
}

// Rule 2: `*` and `?` stay within a component, a `**` component spans any number of them.
function patternRegex(pattern) {
  const parts = pattern.split('/');
  let out = '';
  parts.forEach((part, i) => {
    const last = i === parts.length - 1;
    if (part === '**') {
      out += last ? '.*' : '(?:[^/]*/)*';
      return;
    }
    let piece = '';
    for (const ch of part) {
      if (ch === '*') piece += '[^/]*';
      else if (ch === '?') piece += '[^/]';
      else piece += ch.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
    }
    out += last ? piece : `${piece}/`;
  });
  return new RegExp(`^(?:${out})$`, 's');
}

export function workspaceDigest(root, excludes = DEFAULT_EXCLUDES) {
  const patterns = excludes.map(patternRegex);
  const excluded = (relative) => patterns.some((re) => re.test(relative));
  const skipped = [];

  function walk(dir, relative) {
    const files = [];
    const dirs = [];
    const links = [];
    for (const rawName of fs.readdirSync(dir, { encoding: 'buffer' })) {
      let name;
      try {
        name = utf8.decode(rawName);
      } catch {
        skipped.push(`${relative}${rawName.toString('latin1')}: name is not valid UTF-8`);
        continue;
      }
      const child = relative + name;
      if (excluded(child)) continue;
      const full = Buffer.concat([Buffer.from(dir), Buffer.from('/'), rawName]);
      const stat = fs.lstatSync(full, { bigint: true });
      if (stat.isFile()) {
        const content = fs.readFileSync(full);
        files.push({ name, digest: digestOf(content), executable: (stat.mode & 0o100n) !== 0n, mtimeNs: stat.mtimeNs });
      } else if (stat.isDirectory()) {
        dirs.push({ name, ...walk(full, `${child}/`) });
      } else if (stat.isSymbolicLink()) {
        try {
          links.push({ name, target: utf8.decode(fs.readlinkSync(full, { encoding: 'buffer' })) });
        } catch {
          skipped.push(`${child}: symlink target is not valid UTF-8`);
        }
      } else {
        skipped.push(`${child}: not a regular file, directory or symlink`);
      }
    }
    const byName = (a, b) => Buffer.compare(Buffer.from(a.name, 'utf8'), Buffer.from(b.name, 'utf8'));
    files.sort(byName);
    dirs.sort(byName);
    links.sort(byName);
    const content = Buffer.concat([
      ...files.map((f) => record(1, Buffer.concat([
        text(1, f.name), record(2, encodeDigest(f.digest)), f.executable ? Buffer.from([0x20, 0x01]) : Buffer.alloc(0),
      ]))),
      ...dirs.map((d) => record(2, Buffer.concat([text(1, d.name), record(2, encodeDigest(d.digest))]))),
      ...links.map((l) => record(3, Buffer.concat([text(1, l.name), text(2, l.target)]))),
    ]);
    const times = Buffer.concat([
      ...files.map((f) => record(1, Buffer.concat([text(1, f.name), number(2, f.mtimeNs)]))),
      ...dirs.map((d) => record(2, Buffer.concat([text(1, d.name), record(2, encodeDigest(d.timesDigest))]))),
    ]);
    return { digest: digestOf(content), timesDigest: digestOf(times) };
  }

  const tree = walk(Buffer.from(path.resolve(root)), '');
  return { hash: tree.digest.hash, sizeBytes: tree.digest.size, timesHash: tree.timesDigest.hash, skipped };
}
