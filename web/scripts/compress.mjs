// Writes `.gz` and `.br` next to every compressible file of the build, at the highest
// levels: the control plane serves them as they are (no compression per request).
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { brotliCompressSync, constants, gzipSync } from 'node:zlib';

const COMPRESSIBLE = /\.(html|js|mjs|css|json|svg|txt|map|webmanifest)$/;
const root = process.argv[2] ?? 'build';
let before = 0;
let after = 0;

function walk(dir) {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) {
      walk(path);
    } else if (COMPRESSIBLE.test(name)) {
      const body = readFileSync(path);
      const br = brotliCompressSync(body, {
        params: { [constants.BROTLI_PARAM_QUALITY]: 11, [constants.BROTLI_PARAM_SIZE_HINT]: body.length }
      });
      const gz = gzipSync(body, { level: 9 });
      if (br.length < body.length) writeFileSync(`${path}.br`, br);
      if (gz.length < body.length) writeFileSync(`${path}.gz`, gz);
      before += body.length;
      after += br.length;
    }
  }
}

walk(root);
console.log(`compressed ${(before / 1024).toFixed(0)} KiB to ${(after / 1024).toFixed(0)} KiB (brotli)`);
