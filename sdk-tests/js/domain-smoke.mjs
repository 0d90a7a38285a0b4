// E2B's JavaScript SDK in its default mode: only E2B_DOMAIN and E2B_API_KEY set, so it
// calls https://api.{domain} and reaches the sandbox at https://49983-{sandboxID}.{domain}.
//
// Run by the end-to-end test `e2e_tls` from a network namespace whose DNS answers the
// domain with the control plane's address; NODE_EXTRA_CA_CERTS holds the test's CA.
// Prints DONE.

import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'

const s = await Sandbox.create({ timeoutMs: 300_000 })
try {
  assert.equal(s.getHost(49983), `49983-${s.sandboxId}.sandboxes.test`)
  const r = await s.commands.run('echo hi; hostname')
  assert.ok(r.stdout.startsWith('hi\n'), r.stdout)
  await s.files.write('/tmp/x', 'over https')
  assert.equal(await s.files.read('/tmp/x'), 'over https')
  const info = await Sandbox.getInfo(s.sandboxId)
  assert.equal(info.sandboxId, s.sandboxId)
} finally {
  await s.kill()
}
console.log('DONE')
