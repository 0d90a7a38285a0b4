"""E2B's Python SDK in its default mode: only E2B_DOMAIN and E2B_API_KEY set, so it calls
https://api.{domain} and reaches the sandbox at https://49983-{sandboxID}.{domain}.

Run by the end-to-end test `e2e_tls` from a network namespace whose DNS answers the domain
with the control plane's address; SSL_CERT_FILE holds the test's CA. Prints DONE.
"""

import httpx
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
    # Signed file URLs: anyone holding one reads (or writes) that one path, nothing else.
    url = s.download_url("/tmp/x")
    r = httpx.get(url)
    assert (r.status_code, r.text) == (200, "over https"), (r.status_code, r.text)
    up = s.upload_url("/tmp/up.txt")
    r = httpx.post(up, files={"file": ("up.txt", b"uploaded")})
    assert r.status_code == 200, (r.status_code, r.text)
    assert s.files.read("/tmp/up.txt") == "uploaded"
    assert httpx.post(url, files={"file": ("x", b"y")}).status_code == 401, "a read URL does not write"
    tampered = url.replace("%2Ftmp%2Fx", "%2Fetc%2Fhostname")
    assert tampered != url and httpx.get(tampered).status_code == 401
    expired = s.download_url("/tmp/x", use_signature_expiration=-60)
    assert httpx.get(expired).status_code == 401
finally:
    s.kill()
print("DONE")
