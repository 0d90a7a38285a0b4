// E2B's stock code-interpreter SDK (npm `@e2b/code-interpreter`) against Nestbox's
// `code-interpreter` template: nothing here knows it is not E2B.
//
// Run by the end-to-end test `e2e_code_interpreter` with E2B_API_URL, E2B_API_KEY and
// E2B_SANDBOX_URL pointing at a `nestbox up` that has built the template. The sandbox is
// created the way E2B's examples do, naming no template: the SDK asks for its default,
// `code-interpreter-v1`, which is Nestbox's `code-interpreter`.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Sandbox } from '@e2b/code-interpreter';

let sbx;

before(async () => {
  sbx = await Sandbox.create({ timeoutMs: 900_000 });
});

after(async () => {
  await sbx?.kill();
});

test('cells stream their output and keep state', async () => {
  const seen = [];
  const r = await sbx.runCode("n = 20\nprint('from js')\nn + 1", { onStdout: (m) => seen.push(m.line) });
  assert.equal(r.error, undefined);
  assert.equal(r.text, '21');
  assert.deepEqual(r.logs.stdout, ['from js\n']);
  assert.deepEqual(seen, ['from js\n']);
  assert.equal((await sbx.runCode('n * 2')).text, '40');
});

test('a chart is a PNG and a data frame is data', async () => {
  const chart = await sbx.runCode('import matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4])\nplt.show()');
  const png = chart.results.find((x) => x.png);
  assert.ok(png, 'a PNG result');
  assert.equal(Buffer.from(png.png, 'base64').subarray(1, 4).toString(), 'PNG');
  const frame = await sbx.runCode("import pandas as pd\npd.DataFrame({'c': [5, 6]})");
  assert.deepEqual(frame.results[0].data, { c: [5, 6] });
  assert.ok(frame.results[0].html.includes('<table'));
});

test('an exception comes with its traceback', async () => {
  const r = await sbx.runCode("raise KeyError('missing')");
  assert.equal(r.error.name, 'KeyError');
  assert.match(r.error.traceback, /KeyError/);
});

test('contexts and per-cell environment variables', async () => {
  const ctx = await sbx.createCodeContext({ cwd: '/tmp' });
  assert.equal(ctx.cwd, '/tmp');
  assert.ok((await sbx.listCodeContexts()).some((c) => c.id === ctx.id));
  await sbx.runCode('here = 1', { context: ctx });
  assert.equal((await sbx.runCode('here', { context: ctx })).text, '1');
  await sbx.restartCodeContext(ctx);
  assert.equal((await sbx.runCode('here', { context: ctx })).error.name, 'NameError');
  await sbx.removeCodeContext(ctx);
  const r = await sbx.runCode("import os; os.getenv('JS_CELL')", { envs: { JS_CELL: 'yes' } });
  assert.equal(r.text, 'yes');
});
