// E2B's stock JavaScript SDK against a real Nestbox: nothing here knows it is not E2B.
//
// Run by the end-to-end test `e2e_e2b_sdk` with E2B_API_URL, E2B_API_KEY and E2B_SANDBOX_URL
// pointing at a fresh `nestbox up`, and NESTBOX_OTHER_API_KEY: another team's key.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes, randomUUID } from 'node:crypto'
import {
  Sandbox,
  CommandExitError,
  NotFoundError,
  AuthenticationError,
  SandboxError,
  ALL_TRAFFIC,
  ApiClient,
  ConnectionConfig,
  Template,
  BuildError,
} from 'e2b'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function waitFor(what, check, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const got = await check()
    if (got) return got
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(250)
  }
}

async function infoOrNull(id) {
  try {
    return await Sandbox.getInfo(id)
  } catch (e) {
    if (e instanceof NotFoundError) return null
    throw e
  }
}

let sbx
before(async () => {
  sbx = await Sandbox.create({ metadata: { suite: 'js' }, envs: { GREETING: 'hi' }, timeoutMs: 900_000 })
})
after(async () => {
  await sbx?.kill()
})

test('run: collected, streamed, failing', async () => {
  const r = await sbx.commands.run('echo $GREETING; echo err >&2')
  assert.deepEqual([r.exitCode, r.stdout, r.stderr], [0, 'hi\n', 'err\n'])

  const chunks = []
  const streamed = await sbx.commands.run('for i in 1 2 3; do echo $i; done', {
    onStdout: (d) => chunks.push(d),
  })
  assert.equal(chunks.join(''), '1\n2\n3\n')
  assert.equal(streamed.stdout, '1\n2\n3\n')

  await assert.rejects(sbx.commands.run('echo oops >&2; exit 3'), (e) => {
    assert.ok(e instanceof CommandExitError)
    assert.equal(e.exitCode, 3)
    assert.equal(e.stderr, 'oops\n')
    return true
  })
})

test('background, list, kill, stdin', async () => {
  const sleeper = await sbx.commands.run('sleep 600', { background: true })
  assert.ok((await sbx.commands.list()).some((p) => p.pid === sleeper.pid))
  assert.equal(await sbx.commands.kill(sleeper.pid), true)
  await waitFor('the killed process to go', async () =>
    (await sbx.commands.list()).every((p) => p.pid !== sleeper.pid))

  const cat = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(cat.pid, 'hello from stdin\n')
  await sbx.commands.closeStdin(cat.pid)
  const done = await cat.wait()
  assert.equal(done.stdout, 'hello from stdin\n')
})

test('pty', async () => {
  const out = []
  const term = await sbx.pty.create({ rows: 24, cols: 80, onData: (d) => out.push(Buffer.from(d)) })
  await sbx.pty.resize(term.pid, { rows: 40, cols: 132 })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; echo pty-$((40+2)); exit\n'))
  await term.wait()
  const text = Buffer.concat(out).toString()
  assert.match(text, /40 132/)
  assert.match(text, /pty-42/)

  const idle = await sbx.pty.create({ rows: 24, cols: 80, onData: () => {} })
  assert.equal(await sbx.pty.kill(idle.pid), true)
})

test('files', async () => {
  await sbx.files.write('/tmp/js/a/b.txt', 'content')
  assert.equal(await sbx.files.read('/tmp/js/a/b.txt'), 'content')
  assert.equal(await sbx.files.exists('/tmp/js/a/b.txt'), true)
  assert.equal((await sbx.files.getInfo('/tmp/js/a/b.txt')).size, 7)
  assert.equal(await sbx.files.makeDir('/tmp/js/d'), true)
  const names = (await sbx.files.list('/tmp/js')).map((e) => e.name).sort()
  assert.deepEqual(names, ['a', 'd'])
  const deep = (await sbx.files.list('/tmp/js', { depth: 3 })).map((e) => e.path)
  assert.ok(deep.includes('/tmp/js/a/b.txt'))
  await sbx.files.rename('/tmp/js/a/b.txt', '/tmp/js/c.txt')
  assert.equal(await sbx.files.exists('/tmp/js/a/b.txt'), false)
  await sbx.files.remove('/tmp/js/c.txt')
  assert.equal(await sbx.files.exists('/tmp/js/c.txt'), false)
  await sbx.files.write([
    { path: '/tmp/js/m/1.txt', data: 'one' },
    { path: '/tmp/js/m/2.txt', data: 'two' },
  ])
  assert.equal(await sbx.files.read('/tmp/js/m/2.txt'), 'two')
})

test('gzip, octet-stream and metadata', async () => {
  const data = randomBytes(1 << 20)
  const info = await sbx.files.write('/home/user/js-meta/packed.bin', new Blob([data]), {
    gzip: true,
    metadata: { Owner: 'bob' },
  })
  assert.deepEqual(info.metadata, { owner: 'bob' })
  const back = await sbx.files.read('/home/user/js-meta/packed.bin', { format: 'bytes', gzip: true })
  assert.ok(Buffer.from(back).equals(data))
  assert.deepEqual((await sbx.files.getInfo('/home/user/js-meta/packed.bin')).metadata, { owner: 'bob' })
  await sbx.files.write('/home/user/js-meta/plain.txt', 'plain', { useOctetStream: true })
  assert.equal(await sbx.files.read('/home/user/js-meta/plain.txt'), 'plain')
  await sbx.files.makeDir('/home/user/js-meta/w')
  const events = []
  const handle = await sbx.files.watchDir('/home/user/js-meta/w', (e) => events.push(e), { includeEntry: true })
  await sbx.files.write('/home/user/js-meta/w/e.txt', '12345')
  const withEntry = await waitFor('an event with its entry', () =>
    events.find((e) => e.name === 'e.txt' && e.entry && e.entry.size === 5),
  )
  assert.equal(withEntry.entry.path, '/home/user/js-meta/w/e.txt')
  await handle.stop()
})

test('a 50 MiB round trip is byte-exact', async () => {
  const data = randomBytes(50 << 20)
  await sbx.files.write('/tmp/big-js.bin', new Blob([data]))
  const back = await sbx.files.read('/tmp/big-js.bin', { format: 'bytes' })
  assert.ok(Buffer.from(back).equals(data))
})

test('watch a directory', async () => {
  await sbx.files.makeDir('/tmp/js-watched')
  const events = []
  const handle = await sbx.files.watchDir('/tmp/js-watched', (e) => events.push(e))
  await sbx.files.write('/tmp/js-watched/new.txt', 'x')
  await waitFor('a watch event', () => events.some((e) => e.name === 'new.txt'))
  await handle.stop()
})

test('list: filters and paging', async () => {
  const run = randomUUID().slice(0, 12)
  const made = []
  for (let i = 0; i < 3; i++) {
    made.push(await Sandbox.create({ metadata: { run, n: String(i) }, timeoutMs: 600_000 }))
  }
  try {
    await made[2].pause()
    const pager = Sandbox.list({ query: { metadata: { run } }, limit: 2 })
    const first = await pager.nextItems()
    assert.equal(first.length, 2)
    assert.equal(pager.hasNext, true)
    const second = await pager.nextItems()
    assert.equal(second.length, 1)
    assert.equal(pager.hasNext, false)
    const ids = new Set([...first, ...second].map((s) => s.sandboxId))
    assert.deepEqual(ids, new Set(made.map((s) => s.sandboxId)))
    const paused = await Sandbox.list({ query: { metadata: { run }, state: ['paused'] } }).nextItems()
    assert.deepEqual(paused.map((s) => s.sandboxId), [made[2].sandboxId])
  } finally {
    for (const s of made) await s.kill()
  }
})

test('pause and connect keep processes and tmpfs', async () => {
  const s = await Sandbox.create({ timeoutMs: 600_000 })
  try {
    await s.commands.run('mount -t tmpfs tmpfs /mnt && echo kept > /mnt/f')
    const counter = await s.commands.run('sleep 3600', { background: true })
    assert.equal(await s.pause(), true)
    assert.equal(await s.pause(), false)
    assert.equal((await Sandbox.getInfo(s.sandboxId)).state, 'paused')
    const back = await Sandbox.connect(s.sandboxId)
    assert.equal((await Sandbox.getInfo(s.sandboxId)).state, 'running')
    assert.equal(await back.files.read('/mnt/f'), 'kept\n')
    assert.ok((await back.commands.list()).some((p) => p.pid === counter.pid))
  } finally {
    await s.kill()
  }
})

test('setTimeout, then killed at the deadline', async () => {
  const s = await Sandbox.create({ timeoutMs: 600_000 })
  await s.setTimeout(3_000)
  await waitFor('the sandbox to be killed', async () => (await infoOrNull(s.sandboxId)) === null)
  assert.equal(await Sandbox.kill(s.sandboxId), false)
})

test('paused at the deadline, then connect', async () => {
  const s = await Sandbox.create({ timeoutMs: 4_000, lifecycle: { onTimeout: 'pause' } })
  await s.commands.run('echo before > /tmp/state')
  await waitFor('the sandbox to pause', async () => (await infoOrNull(s.sandboxId))?.state === 'paused')
  const back = await Sandbox.connect(s.sandboxId, { timeoutMs: 600_000 })
  try {
    assert.equal(await back.files.read('/tmp/state'), 'before\n')
  } finally {
    await back.kill()
  }
})

test('fork: copies diverge independently', async () => {
  const src = await Sandbox.create({ timeoutMs: 600_000 })
  try {
    await src.commands.run('echo original > /tmp/state')
    const forks = await src.fork({ count: 2, timeoutMs: 600_000 })
    assert.equal(forks.length, 2)
    try {
      for (const [i, f] of forks.entries()) {
        assert.ok(f instanceof Sandbox, String(f))
        assert.equal(await f.files.read('/tmp/state'), 'original\n')
        await f.commands.run(`echo fork-${i} > /tmp/state`)
      }
      for (const [i, f] of forks.entries()) {
        assert.equal(await f.files.read('/tmp/state'), `fork-${i}\n`)
      }
      assert.equal(await src.files.read('/tmp/state'), 'original\n')
    } finally {
      for (const f of forks) if (f instanceof Sandbox) await f.kill()
    }
  } finally {
    await src.kill()
  }
})

test('metrics', async () => {
  const metrics = await waitFor('metrics samples', async () => {
    const m = await sbx.getMetrics()
    return m.length > 0 ? m : null
  })
  const last = metrics[metrics.length - 1]
  assert.ok(last.cpuCount >= 1)
  assert.ok(last.memTotal > 0)
})

test("logs through the SDK's API client", async () => {
  const marker = `js-log-${randomUUID().slice(0, 8)}`
  await sbx.commands.run(`echo ${marker} > /dev/console`, { user: 'root' })
  const { api } = new ApiClient(new ConnectionConfig())
  const v2 = async (query) => {
    const res = await api.GET('/v2/sandboxes/{sandboxID}/logs', {
      params: { path: { sandboxID: sbx.sandboxId }, query },
    })
    assert.equal(res.response.status, 200, JSON.stringify(res.error))
    return res.data.logs
  }
  const entry = await waitFor('the marker in the log', async () =>
    (await v2({ search: marker })).find((e) => e.message === marker),
  )
  assert.equal(entry.level, 'info')
  assert.equal(entry.fields.source, 'console')
  const newest = await v2({ direction: 'backward', limit: 3 })
  assert.equal(newest.length, 3)
  assert.ok(Date.parse(newest[0].timestamp) >= Date.parse(newest[2].timestamp), 'newest first')
  const v1 = await api.GET('/sandboxes/{sandboxID}/logs', {
    params: { path: { sandboxID: sbx.sandboxId }, query: { start: 0, limit: 1000 } },
  })
  assert.ok(v1.data.logs.some((l) => l.line === marker))
  const other = new ApiClient(new ConnectionConfig({ apiKey: process.env.NESTBOX_OTHER_API_KEY }))
  const hidden = await other.api.GET('/v2/sandboxes/{sandboxID}/logs', {
    params: { path: { sandboxID: sbx.sandboxId } },
  })
  assert.equal(hidden.response.status, 404)
})

test('snapshots', async () => {
  await sbx.files.write('/home/user/js-snapshot.txt', 'snapshot data')
  const snap = await sbx.createSnapshot()
  const child = await Sandbox.create(snap.snapshotId, { timeoutMs: 600_000 })
  try {
    assert.equal(await child.files.read('/home/user/js-snapshot.txt'), 'snapshot data')
  } finally {
    await child.kill()
  }
  assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
  assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), false)
})

test("another team's key gets not-found; a wrong key is refused", async () => {
  const other = process.env.NESTBOX_OTHER_API_KEY
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId, { apiKey: other }), NotFoundError)
  await assert.rejects(Sandbox.connect(sbx.sandboxId, { apiKey: other }), NotFoundError)
  assert.equal(await Sandbox.kill(sbx.sandboxId, { apiKey: other }), false)
  assert.equal((await sbx.commands.run('true')).exitCode, 0)
  await assert.rejects(Sandbox.create({ apiKey: 'e2b_not-a-key' }), AuthenticationError)
})

test('bad input is a clear error', async () => {
  await assert.rejects(Sandbox.create('no-such-template'), (e) => {
    assert.ok(e instanceof SandboxError)
    assert.match(e.message, /404.*no-such-template/)
    return true
  })
})

// The test internet the end-to-end test runs: web servers on port 8080 at the addresses of
// allowed.test, other.test and one more (OPEN), and the DNS server the host resolves with.
const ALLOWED = process.env.NESTBOX_TEST_IP_ALLOWED ?? ''
const OTHER = process.env.NESTBOX_TEST_IP_OTHER ?? ''
const OPEN = process.env.NESTBOX_TEST_IP_OPEN ?? ''

async function reach(s, host, port = 8080) {
  const r = await s.commands.run(
    `timeout 3 bash -c 'exec 3<>/dev/tcp/${host}/${port}' 2>/dev/null && echo OPEN || echo CLOSED`,
  )
  return r.stdout.trim()
}

async function resolve(s, name) {
  const r = await s.commands.run(`getent hosts ${name} | cut -d' ' -f1 || true`)
  return r.stdout.trim()
}

test('egress: allow and deny by address and domain', { skip: !ALLOWED && 'needs NESTBOX_TEST_IP_*' }, async () => {
  const s = await Sandbox.create({
    timeoutMs: 600_000,
    network: { allowOut: ['allowed.test', OPEN], denyOut: [ALL_TRAFFIC] },
  })
  try {
    assert.equal(await resolve(s, 'allowed.test'), ALLOWED)
    assert.equal(await reach(s, 'allowed.test'), 'OPEN')
    assert.equal(await resolve(s, 'other.test'), '')
    assert.equal(await reach(s, OTHER), 'CLOSED')
    assert.equal(await reach(s, OPEN), 'OPEN')

    await s.updateNetwork({ denyOut: [`${OTHER}/32`] })
    assert.equal(await resolve(s, 'other.test'), OTHER)
    assert.equal(await reach(s, 'other.test'), 'CLOSED')
    assert.equal(await reach(s, ALLOWED), 'OPEN')
    await s.updateNetwork({ allowInternetAccess: false })
    assert.equal(await reach(s, ALLOWED), 'CLOSED')
  } finally {
    await s.kill()
  }

  const closed = await Sandbox.create({ timeoutMs: 600_000, allowInternetAccess: false })
  try {
    assert.equal(await reach(closed, ALLOWED), 'CLOSED')
    assert.equal(await resolve(closed, 'allowed.test'), '')
  } finally {
    await closed.kill()
  }
})

test('auto-resume on traffic', async () => {
  const s = await Sandbox.create({
    timeoutMs: 600_000,
    lifecycle: { onTimeout: 'pause', autoResume: true },
  })
  try {
    await s.commands.run('echo kept > /tmp/state')
    await s.pause()
    assert.equal((await Sandbox.getInfo(s.sandboxId)).state, 'paused')
    // The next request to the sandbox resumes it; nothing else is needed.
    assert.equal(await s.files.read('/tmp/state'), 'kept\n')
    assert.equal((await Sandbox.getInfo(s.sandboxId)).state, 'running')
  } finally {
    await s.kill()
  }
})

test("the template SDK builds a template its sandboxes start from", async () => {
  const { mkdtempSync, mkdirSync, writeFileSync, rmSync } = await import('node:fs')
  const { tmpdir } = await import('node:os')
  const { join } = await import('node:path')
  const ctx = mkdtempSync(join(tmpdir(), 'nbx-template-'))
  after(() => rmSync(ctx, { recursive: true, force: true }))
  mkdirSync(join(ctx, 'site'))
  writeFileSync(join(ctx, 'site', 'index.html'), '<h1>from the js template sdk</h1>\n')
  const name = `sdk-js-${randomUUID().slice(0, 8)}`
  const template = Template({ fileContextPath: ctx })
    .fromDebianImage()
    .copy('site/', 'www')
    .setEnvs({ MODE: 'js' })
    .runCmd('echo "$MODE as $(id -un)" > www/built.txt')
  const logs = []
  const info = await Template.build(template, name, { cpuCount: 1, memoryMB: 512, onBuildLogs: (l) => logs.push(l) })
  assert.equal(info.name, name)
  assert.ok(logs.length > 0)
  const s = await Sandbox.create(name, { timeoutMs: 300_000 })
  try {
    // A relative destination is taken from E2B's default directory, the user's home.
    const out = await s.commands.run('cat /home/user/www/index.html /home/user/www/built.txt')
    assert.equal(out.stdout, '<h1>from the js template sdk</h1>\njs as user\n')
  } finally {
    await s.kill()
  }
  await assert.rejects(
    Template.build(Template().fromTemplate('minimal').runCmd('exit 4'), `${name}-broken`),
    (e) => e instanceof BuildError && /exit code 4/.test(e.message),
  )
})

test("template tags pick the build a sandbox starts from", async () => {
  const name = `sdk-js-tags-${randomUUID().slice(0, 8)}`
  const version = (text) => Template().fromTemplate('minimal').runCmd(`echo ${text} > /home/user/version.txt`)
  const versionIn = async (reference) => {
    const s = await Sandbox.create(reference, { timeoutMs: 120_000 })
    try {
      return (await s.commands.run('cat /home/user/version.txt')).stdout.trim()
    } finally {
      await s.kill()
    }
  }
  const first = await Template.build(version('one'), name, { cpuCount: 1, memoryMB: 512 })
  const second = await Template.build(version('two'), name, { tags: ['v2', 'beta'], cpuCount: 1, memoryMB: 512 })
  assert.equal(await versionIn(name), 'one')
  assert.equal(await versionIn(`${name}:beta`), 'two')
  const tags = Object.fromEntries((await Template.getTags(name)).map((t) => [t.tag, t.buildId]))
  assert.deepEqual(tags, { default: first.buildId, v2: second.buildId, beta: second.buildId })

  const info = await Template.assignTags(`${name}:v2`, 'default')
  assert.equal(info.buildId, second.buildId)
  assert.equal(await versionIn(name), 'two')
  await Template.removeTags(name, ['v2', 'beta'])
  assert.deepEqual((await Template.getTags(name)).map((t) => t.tag), ['default'])
  await assert.rejects(Sandbox.create(`${name}:beta`), /not found/i)
})
