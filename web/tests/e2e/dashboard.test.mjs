// The dashboard end to end, in headless Chromium, against a real `nestbox up` with real
// VMs: what a person does with it, checked through the page and through the API. Every
// page is screenshotted and checked with axe-core on the way.
//
// The tests run in order and share one installation: an admin (the installation's), Alice
// (owner of a team that brings its own hosts) and Bob (a plain member of Alice's team).

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  ADMIN_EMAIL,
  ADMIN_PASSWORD,
  PASSWORD,
  URL_,
  call,
  context,
  launch,
  login,
  signIn,
  snap,
  startAgent,
  stopAgent,
  until
} from './harness.mjs';

const PLATFORM_TEAM = 'team-00000000-0000-0000-0000-000000000000';

/** Serious accessibility violations found on any page (checked at the end). */
const violations = [];
const s = {};
let browser;

async function shot(page, name) {
  violations.push(...(await snap(page, name)));
}

/** The text an xterm.js terminal shows. */
async function terminalText(page) {
  return page.locator('.xterm-rows').innerText();
}

async function statusOf(page) {
  return page.locator('header [data-status]').first().getAttribute('data-status');
}

describe('the dashboard', () => {
  before(async () => {
    browser = await launch();
    const stamp = Date.now().toString(36);
    s.adminToken = await login(ADMIN_EMAIL, ADMIN_PASSWORD);
    const alice = await call('POST', '/v1/admin/users', {
      token: s.adminToken,
      body: { email: `alice-${stamp}@example.com`, name: 'Alice', password: PASSWORD }
    });
    const bob = await call('POST', '/v1/admin/users', {
      token: s.adminToken,
      body: { email: `bob-${stamp}@example.com`, name: 'Bob', password: PASSWORD }
    });
    s.alice = { email: alice.user.email, team: alice.team.id, token: await login(alice.user.email, PASSWORD) };
    s.bob = { email: bob.user.email, team: bob.team.id };
    await call('POST', `/v1/teams/${s.alice.team}/members`, {
      token: s.alice.token,
      body: { email: s.bob.email, role: 'member' }
    });
    const key = await call('POST', `/v1/teams/${s.alice.team}/api-keys`, { token: s.alice.token, body: { name: 'checks' } });
    s.aliceKey = key.key;
  });

  after(async () => {
    if (s.agent) await stopAgent(s.agent);
    if (s.agentDir) rmSync(s.agentDir, { recursive: true, force: true });
    await browser?.close();
  });

  test('the sign-in page signs in, and a wrong password gets the API’s message', async () => {
    const ctx = await context(browser);
    const page = await ctx.newPage();
    await page.goto(`${URL_}/dashboard/sandboxes`);
    await page.waitForURL(/\/login\?next=/).catch((e) => {
      throw new Error(`${e.message}\nat ${page.url()}; the browser said:\n${ctx.trace.join('\n')}`);
    });
    await shot(page, 'login');
    await page.getByLabel('Email').fill(s.alice.email);
    await page.getByLabel('Password').fill('not the password');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('alert').filter({ hasText: 'invalid email or password' }).waitFor();
    await page.getByLabel('Password').fill(PASSWORD);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForURL(/\/dashboard\/sandboxes$/);
    // The session is an HttpOnly cookie: the page's scripts cannot read it, nor is it in storage.
    const cookies = await ctx.cookies();
    const session = cookies.find((c) => c.name === 'nestbox_session');
    assert.ok(session?.httpOnly && session.sameSite === 'Strict', JSON.stringify(cookies));
    assert.equal(await page.evaluate(() => document.cookie.includes('nestbox_session')), false);
    const stored = await page.evaluate(() => JSON.stringify({ ...localStorage, ...sessionStorage }));
    assert.ok(!stored.includes(session.value), 'the session is not in web storage');
    s.aliceCtx = ctx;
    s.page = page;
  });

  test('a sandbox created from the page runs', async () => {
    const page = s.page;
    await page.getByTestId('sandboxes').or(page.getByText('No sandboxes yet')).first().waitFor();
    await shot(page, 'sandboxes-empty');
    await page.getByTestId('new-sandbox').click();
    await page.getByLabel('Template').selectOption('minimal');
    await page.locator('textarea[name=metadata]').fill('purpose=e2e');
    await shot(page, 'sandbox-create');
    await page.getByRole('button', { name: 'Create sandbox' }).click();
    await page.waitForURL(/\/dashboard\/sandboxes\/sb-/);
    s.sandbox = page.url().split('/').pop();
    await until('the sandbox to run', async () => (await statusOf(page)) === 'running');
    const api = await call('GET', `/v1/sandboxes/${s.sandbox}`, { key: s.aliceKey });
    assert.equal(api.status, 'running');
    assert.equal(api.metadata.purpose, 'e2e');
    await page.goto(`${URL_}/dashboard/sandboxes`);
    await page.locator(`tr[data-sandbox="${s.sandbox}"] [data-status=running]`).waitFor();
    await shot(page, 'sandboxes');
  });

  test('typing in a terminal echoes, and the terminal is found again after a reload', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}/terminal`);
    await page.locator('.xterm-rows').waitFor();
    await until('a prompt', async () => (await terminalText(page)).includes('#'));
    await page.locator('.xterm-helper-textarea').focus();
    await page.keyboard.type('echo nestbox-$((6*7))\n');
    await until('the echo', async () => (await terminalText(page)).includes('nestbox-42'));
    const tag = await page.getByTestId('terminal').getAttribute('data-tag');
    await shot(page, 'sandbox-terminal');
    // A reload detaches; the shell keeps running and is attached again by its tag.
    await page.reload();
    await page.locator('.xterm-rows').waitFor();
    assert.equal(await page.getByTestId('terminal').getAttribute('data-tag'), tag);
    await page.locator('.xterm-helper-textarea').focus();
    await page.keyboard.type('echo again-$((2+3))\n');
    await until('the echo after the reload', async () => (await terminalText(page)).includes('again-5'));
  });

  test('an uploaded file shows in the browser and through the API', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}/files`);
    await page.getByTestId('files').or(page.getByText('This folder is empty.')).first().waitFor();
    await page.getByTestId('upload').setInputFiles({
      name: 'hello.txt',
      mimeType: 'text/plain',
      buffer: Buffer.from('hello from the browser\n')
    });
    const row = page.locator('tr[data-file="hello.txt"]');
    await row.waitFor();
    await row.getByRole('button', { name: 'hello.txt' }).click();
    await page.getByTestId('preview').filter({ hasText: 'hello from the browser' }).waitFor();
    await shot(page, 'sandbox-file-preview');
    await page.keyboard.press('Escape');
    await shot(page, 'sandbox-files');
    // Downloaded as it is.
    const [download] = await Promise.all([
      page.waitForEvent('download'),
      row.getByRole('button', { name: 'Download' }).click()
    ]);
    assert.equal(download.suggestedFilename(), 'hello.txt');
    const chunks = [];
    for await (const c of await download.createReadStream()) chunks.push(c);
    assert.equal(Buffer.concat(chunks).toString(), 'hello from the browser\n');
    // A second file, deleted after a confirmation.
    await page.getByTestId('upload').setInputFiles({ name: 'doomed.txt', mimeType: 'text/plain', buffer: Buffer.from('x') });
    const doomed = page.locator('tr[data-file="doomed.txt"]');
    await doomed.getByRole('button', { name: 'Delete' }).click();
    await page.getByTestId('confirm-delete').click();
    await doomed.waitFor({ state: 'detached' });
    const gone = await fetch(`${URL_}/v1/sandboxes/${s.sandbox}/files/stat?path=/root/doomed.txt`, {
      headers: { 'x-api-key': s.aliceKey }
    });
    assert.equal(gone.status, 404);
    const r = await fetch(`${URL_}/v1/sandboxes/${s.sandbox}/files/content?path=/root/hello.txt`, {
      headers: { 'x-api-key': s.aliceKey }
    });
    assert.equal(r.status, 200);
    assert.equal(await r.text(), 'hello from the browser\n');
  });

  test('the metrics charts have points', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}/metrics`);
    await until(
      'metric points',
      async () => Number((await page.locator('[data-points]').first().getAttribute('data-points')) ?? 0) > 0,
      { timeout: 90_000 }
    );
    await page.getByRole('button', { name: '2h' }).click();
    await page.getByRole('button', { name: '10m' }).click();
    await page.locator('[data-points]').first().waitFor();
    await shot(page, 'sandbox-metrics');
    // A process started from the page: its output followed live, then killed.
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}/processes`);
    await page.getByTestId('processes').or(page.getByText('No processes')).first().waitFor();
    await page.getByPlaceholder(/Run a command/).fill('for i in $(seq 1 600); do echo tick-$i; sleep 0.5; done');
    await page.getByRole('button', { name: 'Start' }).click();
    await page.locator('pre', { hasText: /tick-\d+/ }).waitFor();
    const row = page.getByTestId('processes').locator('tr', { hasText: 'seq 1 600' });
    await row.waitFor();
    await shot(page, 'sandbox-processes');
    await row.getByRole('button', { name: 'Kill' }).click();
    await row.waitFor({ state: 'detached' });
    const listed = await call('GET', `/v1/sandboxes/${s.sandbox}/processes`, { key: s.aliceKey });
    assert.ok(!listed.items.some((p) => [p.cmd, ...p.args].join(' ').includes('seq 1 600')), JSON.stringify(listed));
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}/ports`);
    await shot(page, 'sandbox-ports');
  });

  test('pause and resume', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}`);
    await page.getByTestId('pause').click();
    await until('paused', async () => (await statusOf(page)) === 'paused');
    assert.equal((await call('GET', `/v1/sandboxes/${s.sandbox}`, { key: s.aliceKey })).status, 'paused');
    await shot(page, 'sandbox-paused');
    await page.getByTestId('resume').click();
    await until('running again', async () => (await statusOf(page)) === 'running');
    // Its memory came back: the file is still there and the sandbox answers.
    const r = await fetch(`${URL_}/v1/sandboxes/${s.sandbox}/files/content?path=/root/hello.txt`, {
      headers: { 'x-api-key': s.aliceKey }
    });
    assert.equal(await r.text(), 'hello from the browser\n');
  });

  test('a snapshot becomes a template that sandboxes launch from', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}`);
    await page.getByTestId('snapshot').click();
    await page.getByLabel('Template name').fill('web-snap');
    await page.getByRole('button', { name: 'Create template' }).click();
    await page.waitForURL(/\/dashboard\/templates/, { timeout: 180_000 });
    const row = page.locator('tr[data-template="web-snap"]');
    await row.waitFor();
    await shot(page, 'templates');
    await row.getByTestId('launch').click();
    await page.waitForURL(/create=web-snap/);
    await page.getByRole('button', { name: 'Create sandbox' }).click();
    await page.waitForURL(/\/dashboard\/sandboxes\/sb-/);
    const launched = page.url().split('/').pop();
    assert.notEqual(launched, s.sandbox);
    await until('the launched sandbox to run', async () => (await statusOf(page)) === 'running');
    const sb = await call('GET', `/v1/sandboxes/${launched}`, { key: s.aliceKey });
    assert.equal(sb.template, 'web-snap');
    const r = await fetch(`${URL_}/v1/sandboxes/${launched}/files/content?path=/root/hello.txt`, {
      headers: { 'x-api-key': s.aliceKey }
    });
    assert.equal(await r.text(), 'hello from the browser\n', 'the snapshot carried the file');
    // Destroyed from the page, after a confirmation.
    await page.getByTestId('destroy').click();
    await page.getByTestId('confirm-destroy').click();
    await page.waitForURL(/\/dashboard\/sandboxes$/);
    await until('the launched sandbox gone', async () => {
      const got = await call('GET', `/v1/sandboxes/${launched}`, { key: s.aliceKey }).catch((e) => e);
      return got.status === 404 || got.status === 'stopped';
    });
  });

  test('template builds show their steps and log, live, and cancel from the page', async () => {
    const page = s.page;
    const steps = [
      { type: 'run', command: 'echo built-on-the-page; echo a-warning >&2' },
      { type: 'env', vars: { FROM_THE_PAGE: '1' } }
    ];
    const build = await call('POST', '/v1/templates/builds', {
      key: s.aliceKey,
      body: { name: 'page-built', recipe: { steps } }
    });
    await page.goto(`${URL_}/dashboard/builds`);
    await page.locator(`tr[data-build="${build.id}"]`).waitFor();
    await page.locator(`tr[data-build="${build.id}"] a`).click();
    await page.waitForURL(new RegExp(`/dashboard/builds/${build.id}`));
    const log = page.getByTestId('build-log');
    await log.getByText('built-on-the-page').waitFor({ timeout: 180_000 });
    await log.locator('.line.stderr', { hasText: 'a-warning' }).waitFor();
    await until('the build to be ready on the page', async () => (await statusOf(page)) === 'ready');
    assert.equal(await page.getByTestId('build-steps').locator('li[data-step-status="done"]').count(), 2);
    await shot(page, 'build');
    await page.goto(`${URL_}/dashboard/builds`);
    await page.locator(`tr[data-build="${build.id}"] [data-status="ready"]`).waitFor();
    await shot(page, 'builds');

    const long = await call('POST', '/v1/templates/builds', {
      key: s.aliceKey,
      body: { name: 'page-cancelled', recipe: { steps: [{ type: 'run', command: 'echo waiting; sleep 600' }] } }
    });
    await page.goto(`${URL_}/dashboard/builds/${long.id}`);
    // The command's own output (the log's info lines quote the command too).
    await page.getByTestId('build-log').locator('.line.stdout', { hasText: 'waiting' }).waitFor({ timeout: 180_000 });
    await page.getByTestId('cancel-build').click();
    await until('the build cancelled on the page', async () => (await statusOf(page)) === 'cancelled');
    const after = await call('GET', `/v1/templates/builds/${long.id}`, { key: s.aliceKey });
    assert.equal(after.status, 'cancelled');
  });

  test('an API key is shown once, works, and is refused once revoked', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/keys`);
    await page.getByTestId('keys').waitFor();
    await page.getByPlaceholder(/A name for the new key/).fill('from-the-page');
    await page.getByTestId('create-key').click();
    const key = (await page.getByTestId('secret').innerText()).trim();
    assert.match(key, /^nbx_[0-9a-f]{64}$/);
    await shot(page, 'keys-created');
    await page.getByRole('button', { name: 'Done' }).click();
    assert.equal((await call('GET', '/v1/sandboxes', { key })).items.length >= 1, true);
    await shot(page, 'keys');
    await page.locator('tr[data-key="from-the-page"]').getByTestId('revoke').click();
    await page.getByTestId('confirm-revoke').click();
    await page.locator('tr[data-key="from-the-page"]').waitFor({ state: 'detached' });
    const refused = await call('GET', '/v1/sandboxes', { key }).catch((e) => e);
    assert.equal(refused.status, 401);
  });

  test('the team, audit log and API reference pages', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/team`);
    await page.locator(`tr[data-member="${s.bob.email}"]`).waitFor();
    await shot(page, 'team');
    await page.goto(`${URL_}/dashboard/audit`);
    await page.getByTestId('audit').waitFor();
    await page.getByLabel('Action').fill('sandbox.create');
    await page.getByRole('button', { name: 'Filter' }).click();
    await page.getByTestId('audit').getByText('sandbox.create').first().waitFor();
    await shot(page, 'audit');
    await page.goto(`${URL_}/docs`);
    await page.locator('.swagger-ui .opblock-tag').first().waitFor();
    await shot(page, 'docs');
    // Its console tries an operation for real.
    await page.locator('.opblock-tag', { hasText: 'system' }).click();
    await page.locator('.opblock-summary', { hasText: '/health/ready' }).click();
    await page.getByRole('button', { name: 'Try it out' }).click();
    await page.getByRole('button', { name: 'Execute' }).click();
    await page.locator('.live-responses-table .response-col_status', { hasText: '200' }).first().waitFor();
  });

  test('a BYOC host registered from the page goes online when its agent joins', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/sandboxes`);
    await page.getByRole('navigation', { name: 'Dashboard' }).waitFor();
    assert.equal(await page.getByTestId('nav-byoc').count(), 0, 'no BYOC item before the team brings hosts');
    // The navigation reads the team afresh: once the team may bring hosts, the item is there.
    await call('PUT', `/v1/admin/teams/${s.alice.team}/byoc`, { token: s.adminToken, body: { enabled: true } });
    await page.goto(`${URL_}/dashboard/templates`);
    await page.getByTestId('nav-byoc').click();
    await page.waitForURL(/\/dashboard\/byoc$/);
    await shot(page, 'byoc-empty');
    await page.getByTestId('register-host').first().click();
    await page.getByLabel('Name').fill('alices-box');
    await page.getByTestId('create-host').click();
    const command = (await page.getByTestId('secret').first().innerText()).trim();
    const token = /--register-token (\S+)/.exec(command)?.[1];
    assert.ok(command.startsWith(`sudo nestbox agent --control-plane ${URL_}`), command);
    assert.ok(token, command);
    await shot(page, 'byoc-register');
    await page.getByRole('button', { name: 'Done' }).click();
    s.agentDir = mkdtempSync(join(tmpdir(), 'nbx-web-byoc-'));
    s.agent = startAgent(token, s.agentDir, 17000 + Math.floor(Math.random() * 2000));
    const row = page.locator('tr[data-host="alices-box"]');
    await until('the host online', async () => (await row.locator('[data-status]').getAttribute('data-status')) === 'online', {
      timeout: 180_000
    }).catch((e) => {
      throw new Error(`${e.message}\nagent log:\n${s.agent.log.slice(-3000)}`);
    });
    await row.getByText(/ago/).waitFor();
    await shot(page, 'byoc');
  });

  test('a member sees no BYOC item and cannot open the admin console', async () => {
    const ctx = await context(browser);
    const page = await signIn(ctx, s.bob.email, PASSWORD);
    // Bob's own team runs on the platform's hosts: no BYOC item; no admin shield.
    await page.getByRole('navigation', { name: 'Dashboard' }).waitFor();
    assert.equal(await page.getByTestId('nav-byoc').count(), 0);
    assert.equal(await page.getByTestId('admin-shield').count(), 0);
    // Acting for Alice's BYOC team, he sees the item disabled: members do not manage hosts.
    await page.getByTestId('team-switcher').selectOption(s.alice.team);
    const item = page.getByTestId('nav-byoc');
    await item.waitFor();
    assert.equal(await item.getAttribute('aria-disabled'), 'true');
    assert.match((await item.getAttribute('title')) ?? '', /owners and admins/);
    await shot(page, 'member-view');
    // Acting for that team, he reaches its sandbox's terminal (the WebSocket names the team
    // it acts for, as a browser cannot send it a header).
    await page.goto(`${URL_}/dashboard/sandboxes/${s.sandbox}/terminal`);
    await page.locator('.xterm-rows').waitFor();
    // Alice's shell, attached again: it shows what comes from now on.
    await page.getByText('press Enter for a prompt').waitFor();
    await page.locator('.xterm-helper-textarea').focus();
    await page.keyboard.type('echo bob-$((40+2))\n');
    await until('Bob’s echo', async () => (await terminalText(page)).includes('bob-42'));
    // The admin console by URL: refused, with nothing of it shown.
    await page.goto(`${URL_}/admin/hosts`);
    await page.getByTestId('admin-denied').waitFor();
    assert.equal(await page.getByTestId('hosts').count(), 0);
    await shot(page, 'admin-denied');
    // Signing out ends the session.
    await page.goto(`${URL_}/dashboard/sandboxes`);
    await page.getByTestId('sign-out').click();
    await page.waitForURL(/\/login/);
    await page.goto(`${URL_}/dashboard/sandboxes`);
    await page.waitForURL(/\/login/);
    await ctx.close();
  });

  test('a platform template can be deleted by platform admins only', async () => {
    // A platform template: the admin snapshots a sandbox of the platform team.
    const sb = await call('POST', '/v1/sandboxes', { token: s.adminToken, team: PLATFORM_TEAM, body: { template: 'minimal' } });
    await call('POST', '/v1/snapshots', {
      token: s.adminToken,
      team: PLATFORM_TEAM,
      body: { sandbox_id: sb.id, name: 'web-platform' }
    });
    await call('DELETE', `/v1/sandboxes/${sb.id}`, { token: s.adminToken, team: PLATFORM_TEAM });

    // Alice (her team's owner) sees its delete half disabled, with the reason.
    const page = s.page;
    await page.goto(`${URL_}/dashboard/templates`);
    const button = page.locator('tr[data-template="web-platform"]').getByTestId('delete-template');
    await button.waitFor();
    assert.equal(await button.getAttribute('aria-disabled'), 'true');
    assert.match((await button.getAttribute('title')) ?? '', /platform admins only/);
    await button.click({ force: true });
    assert.equal(await page.getByTestId('confirm-delete-template').count(), 0, 'no confirmation opens');

    // The platform admin deletes it from the admin console.
    const ctx = await context(browser);
    const admin = await signIn(ctx, ADMIN_EMAIL, ADMIN_PASSWORD);
    await admin.getByTestId('admin-shield').click();
    await admin.waitForURL(/\/admin\/hosts/);
    await admin.getByTestId('admin-badge').waitFor();
    await admin.getByTestId('hosts').waitFor();
    await shot(admin, 'admin-hosts');
    await admin.getByTestId('tab-byoc').click();
    // BYOC hosts with their team's name.
    const byoc = admin.locator('tr[data-host="alices-box"]');
    await byoc.getByText("Alice's team").waitFor();
    await shot(admin, 'admin-hosts-byoc');
    await admin.goto(`${URL_}/admin/templates`);
    const row = admin.locator('tr[data-template="web-platform"]');
    await row.waitFor();
    await shot(admin, 'admin-templates');
    assert.equal(await row.getByTestId('delete-template').getAttribute('aria-disabled'), null);
    await row.getByTestId('delete-template').click();
    await admin.getByTestId('confirm-delete-template').click();
    await until('the template gone', async () => {
      const list = await call('GET', '/v1/templates', { key: s.aliceKey });
      return !list.items.some((t) => t.name === 'web-platform');
    });
    for (const [path, name] of [
      ['/admin/teams', 'admin-teams'],
      ['/admin/users', 'admin-users'],
      ['/admin/audit', 'admin-audit']
    ]) {
      await admin.goto(`${URL_}${path}`);
      await admin.locator('table').first().waitFor();
      await shot(admin, name);
    }
    // A user made and deactivated from the console cannot sign in.
    await admin.goto(`${URL_}/admin/users`);
    await admin.getByRole('button', { name: 'New user' }).click();
    const carol = `carol-${Date.now().toString(36)}@example.com`;
    await admin.getByLabel('Email').fill(carol);
    await admin.getByLabel('Name').fill('Carol');
    await admin.getByLabel(/^Password/).fill(PASSWORD);
    await admin.getByRole('button', { name: 'Create user' }).click();
    const carolRow = admin.locator(`tr[data-user="${carol}"]`);
    await carolRow.waitFor();
    await login(carol, PASSWORD);
    await carolRow.getByRole('button', { name: 'Deactivate' }).click();
    await carolRow.getByText('deactivated').waitFor();
    const refused = await login(carol, PASSWORD).catch((e) => e);
    assert.equal(refused.status, 401);
    await ctx.close();
  });

  test('a BYOC host is deleted from the page', async () => {
    const page = s.page;
    await page.goto(`${URL_}/dashboard/byoc`);
    const row = page.locator('tr[data-host="alices-box"]');
    await row.getByTestId('delete-host').click();
    await page.getByText('No sandboxes run on it.').waitFor();
    await page.getByTestId('confirm-delete-host').click();
    await row.waitFor({ state: 'detached' });
    await stopAgent(s.agent);
    await call('PUT', `/v1/admin/teams/${s.alice.team}/byoc`, { token: s.adminToken, body: { enabled: false } });
  });

  test('phone width, dark theme, and the bundle’s first load', async () => {
    const ctx = await context(browser, { viewport: { width: 390, height: 844 }, isMobile: true });
    const page = await signIn(ctx, s.alice.email, PASSWORD);
    await page.getByTestId('sandboxes').waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, `the page is ${overflow}px wider than a phone`);
    await shot(page, 'phone-sandboxes');
    await page.getByRole('button', { name: 'Menu' }).click();
    await shot(page, 'phone-menu');
    await page.getByRole('button', { name: /theme/ }).click();
    assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), 'dark');
    await page.getByRole('button', { name: 'Menu' }).click();
    await shot(page, 'phone-dark');
    await ctx.close();

    // First load of the sandboxes page, signed in (through the API, so that nothing is
    // cached yet): the JavaScript it transfers.
    const fresh = await context(browser);
    const signedIn = await fresh.request.post(`${URL_}/v1/auth/session`, { data: { email: s.alice.email, password: PASSWORD } });
    assert.equal(signedIn.status(), 200);
    const page2 = await fresh.newPage();
    const scripts = [];
    page2.on('requestfinished', async (req) => {
      if (req.resourceType() !== 'script') return;
      const sizes = req.sizes();
      const response = req.response();
      scripts.push(Promise.all([sizes, response]).then(([z, r]) => ({ url: req.url(), size: z.responseBodySize, encoding: r?.headers()['content-encoding'] })));
    });
    await page2.goto(`${URL_}/dashboard/sandboxes`);
    await page2.getByTestId('sandboxes').waitFor();
    await page2.waitForLoadState('networkidle');
    const loaded = await Promise.all(scripts);
    const js = loaded.reduce((sum, x) => sum + x.size, 0);
    console.log(`first load of the sandboxes page: ${loaded.length} scripts, ${(js / 1024).toFixed(1)} KiB of JavaScript transferred`);
    assert.ok(loaded.length > 0 && js < 300 * 1024, `first load transfers ${js} bytes of JavaScript`);
    // Served compressed (files so small that compressing them saves nothing are sent as they are).
    const plain = loaded.filter((x) => x.encoding !== 'br' && x.size > 512);
    assert.deepEqual(plain, [], 'scripts are served compressed');
    // The page's own script policy.
    const csp = await page2.locator('meta[http-equiv=content-security-policy]').getAttribute('content');
    assert.match(csp ?? '', /script-src 'self' 'sha256-/);
    await fresh.close();
  });

  test('no page has serious accessibility violations, and no page threw', async () => {
    assert.deepEqual(violations, []);
    assert.deepEqual(s.aliceCtx.errors, []);
  });
});
