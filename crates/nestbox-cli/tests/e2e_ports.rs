//! Ports with real VMs: a server started in a sandbox answers through the control plane's
//! proxy in all three routing forms, WebSocket upgrades pass through, credentials never
//! reach the sandbox, and nobody without the team's credentials or the sandbox's tokens
//! gets in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Nestbox, Options, eventually, sh_ok};
use futures::{SinkExt, StreamExt};
use nestbox_types::api::CreateSandboxRequest;
use nestbox_types::{ErrorBody, ErrorCode, SandboxId};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A small HTTP/1.1 server with a WebSocket echo, standard library only. Every plain
/// request is answered with what the sandbox saw of it.
const SERVER: &str = r#"
import base64, hashlib, socket, sys, threading
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def frame(op, data):
    n = len(data)
    head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big"))
    return head + data
def serve(c):
    f = c.makefile("rb")
    while True:
        line = f.readline()
        if not line:
            return
        method, path, _ = line.decode().split(" ", 2)
        h = {}
        while True:
            l = f.readline().decode()
            if l in ("\r\n", "\n", ""):
                break
            k, v = l.split(":", 1)
            h[k.strip().lower()] = v.strip()
        n = int(h.get("content-length", "0"))
        body = f.read(n) if n else b""
        if h.get("upgrade", "").lower() == "websocket":
            key = h["sec-websocket-key"] + GUID
            accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
            c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
            while True:
                b = f.read(2)
                if len(b) < 2:
                    return
                op, n = b[0] & 0x0F, b[1] & 0x7F
                if n == 126:
                    n = int.from_bytes(f.read(2), "big")
                elif n == 127:
                    n = int.from_bytes(f.read(8), "big")
                mask = f.read(4) if b[1] & 0x80 else b"\0\0\0\0"
                data = bytes(x ^ mask[i % 4] for i, x in enumerate(f.read(n)))
                if op == 8:
                    c.sendall(frame(8, b""))
                    return
                c.sendall(frame(op, b"echo:" + data))
        seen = "%s %s host=%s auth=%s key=%s traffic=%s body=%s" % (
            method, path, h.get("host", "-"), h.get("authorization", "-"), h.get("x-api-key", "-"),
            h.get("e2b-traffic-access-token", "-"), body.decode())
        out = seen.encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

const DOMAIN: &str = "sandboxes.test";
const PORT: u16 = 8080;

async fn error_code(response: reqwest::Response) -> ErrorCode {
    let status = response.status();
    let body: ErrorBody = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("status {status}: not an error body: {e}"));
    body.error.code
}

/// Starts the server in `id` and waits until it answers through the proxy.
async fn start_server(nb: &Nestbox, http: &reqwest::Client, id: SandboxId) {
    let client = nb.client();
    client
        .upload(id, "/root/server.py", reqwest::Body::from(SERVER), None)
        .await
        .unwrap();
    sh_ok(
        &client,
        id,
        &format!("nohup python3 /root/server.py {PORT} >/root/server.log 2>&1 &"),
    )
    .await;
    let url = format!("{}/v1/sandboxes/{id}/ports/{PORT}/ready", nb.url);
    eventually(Duration::from_secs(60), "the server answers", || async {
        let r = http
            .get(&url)
            .header("x-api-key", &nb.api_key)
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_in_a_sandbox_answers_through_the_proxy() {
    let nb = Nestbox::up_with(Options {
        env: vec![("NESTBOX_PROXY_DOMAIN".into(), DOMAIN.into())],
        ..Default::default()
    });
    let client = nb.client();
    let http = reqwest::Client::new();
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("python".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = sb.id;
    let traffic = sb
        .traffic_access_token
        .clone()
        .expect("create returns the traffic token");
    let envd = sb
        .envd_access_token
        .clone()
        .expect("create returns the guest token");
    start_server(&nb, &http, id).await;

    // 1. Path form: the prefix is removed, the query kept, the API key never forwarded.
    let text = http
        .get(format!(
            "{}/v1/sandboxes/{id}/ports/{PORT}/hello/world?x=1",
            nb.url
        ))
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.starts_with("GET /hello/world?x=1 "), "{text}");
    assert!(text.contains("key=-") && text.contains("auth=-"), "{text}");
    // The caller's own Authorization is the app's business: it arrives untouched.
    let text = http
        .get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/private", nb.url))
        .header("x-api-key", &nb.api_key)
        .header("authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("auth=Basic dXNlcjpwdw== "), "{text}");

    // 2. E2B's headers: any path, body streamed through.
    let text = http
        .post(format!("{}/any/path", nb.url))
        .header("e2b-sandbox-id", id.to_string())
        .header("e2b-sandbox-port", PORT.to_string())
        .header("x-api-key", &nb.api_key)
        .body("hello body")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.starts_with("POST /any/path "), "{text}");
    assert!(text.ends_with("body=hello body"), "{text}");

    // 3. Host name `{port}-{id}.{domain}`: the path is untouched, the host name kept.
    let host = format!("{PORT}-{id}.{DOMAIN}");
    let text = http
        .get(format!("{}/by/host", nb.url))
        .header("host", &host)
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.starts_with("GET /by/host "), "{text}");
    assert!(text.contains(&format!("host={host}")), "{text}");

    // The traffic token alone opens the ports, and is not forwarded either.
    let text = http
        .get(format!("{}/t", nb.url))
        .header("host", &host)
        .header("e2b-traffic-access-token", &traffic)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.starts_with("GET /t ") && text.contains("traffic=-"),
        "{text}"
    );

    // A member's session works too; its bearer token stays with the platform.
    let login = nb
        .anonymous()
        .login(&nb.admin_email, &nb.admin_password)
        .await
        .unwrap();
    let text = http
        .get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/s", nb.url))
        .bearer_auth(&login.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.starts_with("GET /s ") && text.contains("auth=-"),
        "{text}"
    );

    // 4. A WebSocket echo through the proxy.
    let ws_url = format!(
        "{}/v1/sandboxes/{id}/ports/{PORT}/ws",
        nb.url.replace("http://", "ws://")
    );
    let mut request = ws_url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", nb.api_key.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    for word in ["ping", "pong"] {
        ws.send(Message::text(word)).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("echo:{word}"));
    }
    ws.close(None).await.unwrap();

    // 5. The guest agent's port needs its access token, checked before anything is sent.
    let guest = format!("{}/v1/sandboxes/{id}/ports/49983/health", nb.url);
    let r = http
        .get(&guest)
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, ErrorCode::Forbidden);
    let r = http
        .get(&guest)
        .header("x-api-key", &nb.api_key)
        .header("x-access-token", "not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .get(&guest)
        .header("x-api-key", &nb.api_key)
        .header("x-access-token", &envd)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    // That token alone opens the guest agent (it is all E2B's SDKs send), and nothing else.
    let r = http
        .get(&guest)
        .header("x-access-token", &envd)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = http
        .get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/", nb.url))
        .header("x-access-token", &envd)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the guest's token opens no other port");

    // 6. Clear answers, at once, for a port nobody listens on and for bad targets.
    let r = http
        .get(format!("{}/v1/sandboxes/{id}/ports/9/x", nb.url))
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, ErrorCode::PortUnreachable);
    let r = http
        .get(format!("{}/", nb.url))
        .header("e2b-sandbox-id", id.to_string())
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, ErrorCode::InvalidRequest);

    // 7. No credentials, a wrong traffic token, another team: nothing gets through.
    let r = http
        .get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/", nb.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{}/", nb.url))
        .header("host", &host)
        .header("e2b-traffic-access-token", "0".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, ErrorCode::SandboxNotFound);
    let key = common::other_team_key(&nb, "ports-other@example.com").await;
    for request in [
        http.get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/", nb.url)),
        http.get(format!("{}/", nb.url)).header("host", &host),
        http.get(format!("{}/", nb.url))
            .header("e2b-sandbox-id", id.to_string())
            .header("e2b-sandbox-port", PORT.to_string()),
    ] {
        let r = request.header("x-api-key", &key).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(error_code(r).await, ErrorCode::SandboxNotFound);
    }

    // 7b. Rotated tokens: the old ones open nothing any more — neither the guest agent nor
    // the ports — and the new ones do.
    let rotated = client.rotate_tokens(id).await.unwrap();
    let traffic2 = rotated.traffic_access_token.unwrap();
    let envd2 = rotated.envd_access_token.unwrap();
    assert!(traffic2 != traffic && envd2 != envd, "new tokens");
    let file = format!(
        "{}/v1/sandboxes/{id}/ports/49983/files?path=/etc/hostname",
        nb.url
    );
    let r = http
        .get(&file)
        .header("x-access-token", &envd)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the old guest token opens nothing");
    let r = http
        .get(&file)
        .header("x-access-token", &envd2)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "the new one does: {}", r.status());
    let r = http
        .get(format!("{}/t", nb.url))
        .header("host", &host)
        .header("e2b-traffic-access-token", &traffic)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, ErrorCode::SandboxNotFound);
    let text = http
        .get(format!("{}/t2", nb.url))
        .header("host", &host)
        .header("e2b-traffic-access-token", &traffic2)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.starts_with("GET /t2 "), "{text}");
    // The platform's own calls still reach the guest (the host agent holds its new token).
    let out = client
        .exec(
            id,
            &nestbox_types::api::ExecRequest {
                command: Some("cat /etc/hostname".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");

    // 8. A paused sandbox answers at once that it is not running; so does a destroyed one.
    client.pause_sandbox(id).await.unwrap();
    let r = http
        .get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/", nb.url))
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(error_code(r).await, ErrorCode::SandboxNotRunning);
    // Tokens rotated while it is paused: its guest agent takes the new one as it resumes,
    // and refuses the one it held before the pause.
    let rotated = client.rotate_tokens(id).await.unwrap();
    let envd3 = rotated.envd_access_token.unwrap();
    assert_ne!(envd3, envd2);
    // Resumed, the same server (same process, same memory) answers again.
    client.resume_sandbox(id).await.unwrap();
    for (token, want) in [(&envd2, 401), (&envd3, 200)] {
        let r = http
            .get(&file)
            .header("x-access-token", token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "after a rotation while paused");
    }
    let text = http
        .get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/again", nb.url))
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.starts_with("GET /again "), "{text}");
    client.destroy_sandbox(id).await.unwrap();
    let r = http
        .get(format!("{}/v1/sandboxes/{id}/ports/{PORT}/", nb.url))
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, ErrorCode::SandboxNotRunning);

    // 9. A sandbox with public ports answers anyone, and still strips our credentials; its
    // guest agent still wants its own token.
    let public = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("python".into()),
            public_traffic: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(public.public_traffic);
    start_server(&nb, &http, public.id).await;
    let text = http
        .get(format!("{}/open", nb.url))
        .header("e2b-sandbox-id", public.id.to_string())
        .header("e2b-sandbox-port", PORT.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.starts_with("GET /open ") && text.contains("key=-"),
        "{text}"
    );
    let other = common::other_team_key(&nb, "ports-public@example.com").await;
    let text = http
        .get(format!("{}/keyed", nb.url))
        .header("host", format!("{PORT}-{}.{DOMAIN}", public.id))
        .header("x-api-key", &other)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.starts_with("GET /keyed ") && text.contains("key=-"),
        "{text}"
    );
    // Never under the API's own paths: there a public sandbox is as private as any.
    let r = http
        .get(format!(
            "{}/v1/sandboxes/{}/ports/{PORT}/",
            nb.url, public.id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{}/health", nb.url))
        .header("e2b-sandbox-id", public.id.to_string())
        .header("e2b-sandbox-port", "49983")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    client.destroy_sandbox(public.id).await.unwrap();
}
