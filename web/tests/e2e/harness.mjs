// What the dashboard's browser tests share: the installation under test (from the
// environment the Rust test `e2e_dashboard` sets), Debian's Chromium driven by
// playwright-core, an API client for set-up and checks, screenshots and axe-core.

import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { launch } from './harness-browser.mjs';

const require = createRequire(import.meta.url);

export { launch };

export const URL_ = must('NESTBOX_URL');
export const ADMIN_EMAIL = must('NESTBOX_ADMIN_EMAIL');
export const ADMIN_PASSWORD = must('NESTBOX_ADMIN_PASSWORD');
export const SHOTS = process.env.NESTBOX_SCREENSHOTS ?? 'screenshots';
export const PASSWORD = 'correct horse battery staple';

function must(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run this suite through \`cargo nextest run --test e2e_dashboard\``);
  return v;
}

/** A browser context of its own (its own cookies), failing the test on page errors. */
export async function context(browser, options = {}) {
  // `bypassCSP` only lets axe-core's script in; the page's own policy is tested by reading it.
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 }, bypassCSP: true, ...options });
  ctx.setDefaultTimeout(30_000);
  ctx.errors = [];
  // What the browser said, for the message of a test that fails (never asserted: a 401
  // answer is a console error too).
  ctx.trace = [];
  ctx.on('page', (page) => {
    page.on('pageerror', (e) => ctx.errors.push(`${page.url()}: ${e.message}`));
    page.on('console', (m) => m.type() === 'error' && ctx.trace.push(`console: ${m.text()}`));
    page.on('requestfailed', (r) => ctx.trace.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
    page.on('framenavigated', (f) => f === page.mainFrame() && ctx.trace.push(`navigated: ${f.url()}`));
  });
  return ctx;
}

/** Signs in through the sign-in page. */
export async function signIn(ctx, email, password) {
  const page = await ctx.newPage();
  await page.goto(`${URL_}/login`);
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.waitForURL(/\/dashboard\/sandboxes/);
  // Signed in for good: the shell shows (a stale answer about no session must not undo it).
  await page.getByTestId('sign-out').waitFor({ state: 'attached' });
  return page;
}

/** A JSON API call; throws on an error answer. */
export async function call(method, path, { body, key, token, team } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers['x-api-key'] = key;
  if (token) headers.authorization = `Bearer ${token}`;
  if (team) headers['x-nestbox-team'] = team;
  const r = await fetch(`${URL_}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  const data = text ? JSON.parse(text) : undefined;
  if (!r.ok) {
    const e = new Error(`${method} ${path}: ${r.status} ${text}`);
    e.status = r.status;
    throw e;
  }
  return data;
}

/** A session token (for set-up through the API). */
export async function login(email, password) {
  return (await call('POST', '/v1/auth/login', { body: { email, password } })).token;
}

/** Waits until `check` returns something truthy. */
export async function until(what, check, { timeout = 120_000, every = 500 } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

const axeSource = require.resolve('axe-core/axe.min.js');

/** Saves a screenshot of the page as `name.png`, and checks it with axe-core: returns the
 * serious and critical violations (WCAG 2 A and AA rules). */
export async function snap(page, name) {
  mkdirSync(SHOTS, { recursive: true });
  await page.waitForLoadState('networkidle').catch(() => {});
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
  await page.addScriptTag({ path: axeSource });
  const result = await page.evaluate(async () => {
    // eslint-disable-next-line no-undef
    const r = await axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } });
    return r.violations
      .filter((v) => v.impact === 'serious' || v.impact === 'critical')
      .map((v) => `${v.id} (${v.impact}): ${v.help} — ${v.nodes.map((n) => n.target.join(' ')).slice(0, 5).join(', ')}`);
  });
  return result.map((v) => `${name}: ${v}`);
}

/** Starts a host agent that joins with `token` (a BYOC host of the test), on loopback. */
export function startAgent(token, dir, port) {
  const bin = must('NESTBOX_BIN');
  const child = spawn(
    bin,
    [
      'agent',
      '--control-plane',
      URL_,
      '--register-token',
      token,
      '--data-dir',
      join(dir, 'agent'),
      '--images-dir',
      must('NESTBOX_TEST_IMAGES'),
      '--listen',
      `127.0.0.1:${port}`,
      '--clone-pool',
      '0'
    ],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NESTBOX_LOG: 'info' } }
  );
  child.log = '';
  child.stderr.on('data', (d) => (child.log += d));
  return child;
}

/** Stops an agent and waits for it. */
export async function stopAgent(child) {
  if (child.exitCode !== null) return;
  const done = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  await done;
  clearTimeout(timer);
}
