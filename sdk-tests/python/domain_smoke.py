"""E2B's Python SDK in its default mode: only E2B_DOMAIN and E2B_API_KEY set, so it calls
https://api.{domain} and reaches the sandbox at https://49983-{sandboxID}.{domain}.

Run by the end-to-end test `e2e_tls` from a network namespace whose DNS answers the domain
with the control plane's address; SSL_CERT_FILE holds the test's CA. Prints DONE.
"""

from e2b import Sandbox

s = Sandbox.create(timeout=300)
try:
    assert s.get_host(49983) == f"49983-{s.sandbox_id}.sandboxes.test", s.get_host(49983)
    r = s.commands.run("echo hi; hostname")
    assert r.stdout.startswith("hi\n"), r.stdout
    s.files.write("/tmp/x", "over https")
    assert s.files.read("/tmp/x") == "over https"
    chunks = []
    s.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=chunks.append)
    assert "".join(chunks) == "1\n2\n3\n", chunks
    assert Sandbox.get_info(s.sandbox_id).sandbox_id == s.sandbox_id
finally:
    s.kill()
print("DONE")
