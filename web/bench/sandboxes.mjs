// Benchmark: the sandboxes page with 500 sandboxes, in headless Chromium, with the API
// answered by fixtures (no control plane needed): the built page (`npm run build`) is
// served from `build/`, every `/v1` request is fulfilled here.
//
// Prints, for 10 (the baseline, in the same process) and for 500 sandboxes: the time from
// navigation to every row on screen, the long tasks (> 50 ms, what a user feels as jank)
// during that first render, and the same during 15 s of live updates (the page polls every
// 3 s; each poll here changes some statuses). Run with `npm run bench` (or `make bench-web`).

import { createReadStream, existsSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { extname, join, normalize } from 'node:path';
import { launch } from '../tests/e2e/harness-browser.mjs';

const ROOT = new URL('../build/', import.meta.url).pathname;
if (!existsSync(join(ROOT, 'index.html'))) throw new Error('no build: run `npm run build` first');

const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.svg': 'image/svg+xml' };
const server = createServer((req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
  let file = join(ROOT, path);
  if (!file.startsWith(ROOT) || !existsSync(file) || statSync(file).isDirectory()) file = join(ROOT, 'index.html');
  res.setHeader('content-type', TYPES[extname(file)] ?? 'application/octet-stream');
  createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;

const TEAM = 'team-11111111-1111-1111-1111-111111111111';
const user = { id: 'user-22222222-2222-2222-2222-222222222222', email: 'bench@example.com', name: 'Bench', is_admin: false, active: true, created_at: '2026-01-01T00:00:00Z' };
const me = { user, team_id: TEAM, teams: [{ team: { id: TEAM, name: 'Bench', is_byoc: false, created_at: '2026-01-01T00:00:00Z' }, role: 'owner', is_default: true }] };

function sandboxes(n, round) {
  return Array.from({ length: n }, (_, i) => ({
    id: `sb-${String(i).padStart(8, '0')}-0000-4000-8000-000000000000`,
    team_id: TEAM,
    template: i % 3 ? 'python' : 'minimal',
    status: (i + round) % 7 === 0 ? 'paused' : 'running',
    vcpus: 1 + (i % 4),
    memory_mb: 512 * (1 + (i % 4)),
    disk_size_mb: 5120,
    timeout_sec: 300,
    metadata: { user: `u${i % 50}`, job: `j${i}` },
    created_at: new Date(Date.now() - i * 60_000).toISOString(),
    on_expiry: 'destroy'
  }));
}

async function measure(browser, n) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await ctx.newPage();
  let round = 0;
  await page.route('**/v1/**', async (route) => {
    const url = new URL(route.request().url());
    const json = (body) => route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(body) });
    if (url.pathname === '/v1/auth/session') return json({ csrf_token: 'x', expires_at: '2099-01-01T00:00:00Z', user });
    if (url.pathname === '/v1/me') return json(me);
    if (url.pathname === '/v1/sandboxes') {
      const all = sandboxes(n, round);
      const start = Number(url.searchParams.get('cursor') ?? 0);
      const limit = Number(url.searchParams.get('limit') ?? 50);
      const items = all.slice(start, start + limit);
      if (start + limit >= n) round++;
      return json({ items, next_cursor: start + limit < n ? String(start + limit) : undefined });
    }
    return json({ items: [] });
  });
  await page.addInitScript(() => {
    window.__long = [];
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) window.__long.push(e.duration);
    }).observe({ type: 'longtask', buffered: true });
  });
  const t0 = Date.now();
  await page.goto(`${base}/dashboard/sandboxes`);
  await page.locator('tr[data-sandbox]').nth(n - 1).waitFor();
  const firstRender = Date.now() - t0;
  const initial = await page.evaluate(() => window.__long.splice(0));
  await page.waitForTimeout(15_000);
  const live = await page.evaluate(() => window.__long.splice(0));
  await ctx.close();
  return { firstRender, initial, live };
}

const sum = (a) => a.reduce((x, y) => x + y, 0);
const max = (a) => (a.length ? Math.max(...a) : 0);
const browser = await launch();
try {
  const small = await measure(browser, 10);
  const big = await measure(browser, 500);
  const row = (name, r) =>
    `${name.padEnd(14)} first render ${String(r.firstRender).padStart(5)} ms | long tasks at render: ${r.initial.length} (max ${max(r.initial).toFixed(0)} ms) | during 15 s of updates: ${r.live.length} (max ${max(r.live).toFixed(0)} ms, ${sum(r.live).toFixed(0)} ms in all)`;
  console.log('sandboxes page, API answered by fixtures');
  console.log(row('10 sandboxes', small));
  console.log(row('500 sandboxes', big));
  console.log(`ratio 500/10: first render ×${(big.firstRender / small.firstRender).toFixed(2)}`);
} finally {
  await browser.close();
  server.close();
}
