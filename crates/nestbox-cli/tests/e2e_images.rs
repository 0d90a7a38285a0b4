//! OCI images as template bases, with real VMs: an image made with Debian's `umoci` (a
//! busybox userland in two layers, the second deleting files of the first), pushed with
//! `skopeo` to Debian's `docker-registry` running on this machine behind a password, with
//! gzip and with zstd layers. A recipe and a Dockerfile build from it; the template's
//! sandboxes run the image's entrypoint as its user, in its directory, with its
//! environment; a rebuild takes the image from the cache; no credentials, no build.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Nestbox, free_port, sh_ok};
use nestbox_client::Client;
use nestbox_types::api::{
    BuildStep, CreateBuildRequest, CreateSandboxRequest, Recipe, RegistryAuth,
};
use nestbox_types::{BuildId, BuildStatus};

/// A registry on loopback, behind `user`/`pass`.
struct Registry {
    server: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let htpasswd = run(Command::new("htpasswd").args(["-Bbn", "user", "pass"]));
        std::fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {root}/data}}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: test-only-secret\n\
                 auth:\n  htpasswd: {{realm: test-realm, path: {root}/htpasswd}}\n",
                root = dir.path().display()
            ),
        )
        .unwrap();
        let server = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry (scripts/install-deps.sh --test installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            server,
            port,
            _dir: dir,
        }
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Makes the image with umoci and pushes it as `demo/busy:gzip` and `demo/busy:zstd`.
const IMAGE_SCRIPT: &str = r#"
set -euo pipefail
cd "$1"; REG="$2"
umoci init --layout oci
umoci new --image oci:busy
umoci unpack --image oci:busy bundle
R=bundle/rootfs
mkdir -p $R/bin $R/etc $R/tmp $R/root $R/home/app $R/opt/app/olddir/sub
chmod 1777 $R/tmp
cp /bin/busybox $R/bin/busybox
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox $R/bin/$a; done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001:app:/home/app:/bin/sh\n' > $R/etc/passwd
printf 'root:x:0:\napp:x:1001:\n' > $R/etc/group
echo "hello from layer 1" > $R/opt/app/hello.txt
echo "delete me" > $R/opt/app/remove-me.txt
echo old > $R/opt/app/olddir/sub/b.txt
chown -R 1001:1001 $R/home/app $R/opt/app
umoci repack --refresh-bundle --image oci:busy bundle
rm -f $R/opt/app/remove-me.txt; rm -rf $R/opt/app/olddir
echo "added in layer 2" > $R/opt/app/added.txt; chown 1001:1001 $R/opt/app/added.txt
umoci repack --image oci:busy bundle
umoci config --image oci:busy \
  --config.env GREETING=hello-from-oci --config.env PATH=/usr/local/bin:/usr/bin:/bin \
  --config.workingdir /opt/app --config.user app \
  --config.entrypoint /bin/sh --config.entrypoint=-c \
  --config.entrypoint 'echo "$GREETING from $(pwd) as $(id -un)" > /tmp/entry.log; exec httpd -f -p 8080 -h /opt/app' \
  --architecture amd64 --os linux
# zstd layers: converted here, not at the push (which would reuse the gzip blobs).
skopeo copy -q --dest-compress-format zstd oci:oci:busy oci:oci-zstd:busy
skopeo copy -q --dest-tls-verify=false --dest-creds user:pass oci:oci:busy docker://$REG/demo/busy:gzip
skopeo copy -q --dest-tls-verify=false --dest-creds user:pass oci:oci-zstd:busy docker://$REG/demo/busy:zstd
"#;

async fn wait_ended(client: &Client, id: BuildId) -> nestbox_types::api::Build {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let b = client.get_build(id).await.unwrap();
        if b.status.is_final() {
            return b;
        }
        assert!(Instant::now() < deadline, "build {id} did not end");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn log_text(client: &Client, id: BuildId) -> String {
    let mut out = String::new();
    let mut offset = 0;
    loop {
        let page = client.build_logs(id, offset).await.unwrap();
        if page.items.is_empty() {
            return out;
        }
        for l in &page.items {
            out.push_str(&format!("[{} {}] {}\n", l.step, l.stream, l.text));
        }
        offset = page.next;
        if page.done {
            return out;
        }
    }
}

fn image_build(name: &str, image: String, last: &str, auth: bool) -> CreateBuildRequest {
    CreateBuildRequest {
        name: name.into(),
        recipe: Recipe {
            image: Some(image),
            steps: vec![
                BuildStep::Run {
                    command: "echo built by the recipe > /opt/app/built.txt".into(),
                    user: None,
                    cwd: None,
                },
                BuildStep::Run {
                    command: last.into(),
                    user: None,
                    cwd: None,
                },
            ],
            ..Default::default()
        },
        timeout_sec: None,
        no_cache: false,
        registry_auth: auth.then(|| RegistryAuth {
            username: "user".into(),
            password: "pass".into(),
        }),
        tags: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_images_from_a_registry_become_templates() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    run(Command::new("bash")
        .arg("-c")
        .arg(IMAGE_SCRIPT)
        .arg("image-script")
        .arg(work.path())
        .arg(registry.authority()));
    let nb = Nestbox::up_env(&[("NESTBOX_INSECURE_REGISTRIES", &registry.authority())]);
    let client = nb.client();
    let gzip = format!("{}/demo/busy:gzip", registry.authority());

    // ---- a recipe from the image (gzip layers)
    let began = Instant::now();
    let b = client
        .create_build(&image_build("busy", gzip.clone(), "echo first", true))
        .await
        .unwrap();
    let b = wait_ended(&client, b.id).await;
    let log = log_text(&client, b.id).await;
    assert_eq!(b.status, BuildStatus::Ready, "{:?}\n{log}", b.error);
    eprintln!(
        "build from the image: {:.1} s",
        began.elapsed().as_secs_f64()
    );
    assert!(log.contains("pulling the image"), "{log}");
    assert_eq!(
        b.steps.len(),
        3,
        "two steps and the entrypoint: {:?}",
        b.steps
    );
    assert!(b.steps[2].summary.contains("httpd"), "{:?}", b.steps);

    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("busy".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    // The entrypoint ran as the image's user, in its directory, with its environment, and
    // its server answers.
    assert_eq!(
        sh_ok(&client, sb, "cat /tmp/entry.log").await.trim(),
        "hello-from-oci from /opt/app as app"
    );
    assert_eq!(
        sh_ok(&client, sb, "wget -qO- http://127.0.0.1:8080/hello.txt")
            .await
            .trim(),
        "hello from layer 1"
    );
    assert_eq!(
        sh_ok(&client, sb, "echo $GREETING").await.trim(),
        "hello-from-oci"
    );
    // Commands that name no user or directory run as the image's, as in a container.
    assert_eq!(sh_ok(&client, sb, "id -un; pwd").await, "app\n/opt/app\n");
    // The second layer's deletions (whiteouts) and additions, and the recipe's step, which
    // ran as the image's user.
    assert_eq!(
        sh_ok(
            &client,
            sb,
            "cd /opt/app; ls -a; stat -c %U built.txt; cat added.txt built.txt"
        )
        .await,
        ".\n..\nadded.txt\nbuilt.txt\nhello.txt\napp\nadded in layer 2\nbuilt by the recipe\n"
    );
    client.destroy_sandbox(sb).await.unwrap();

    // ---- a rebuild with another last step takes the image and the first step from the cache
    let again = client
        .create_build(&image_build("busy", gzip.clone(), "echo changed", true))
        .await
        .unwrap();
    let again = wait_ended(&client, again.id).await;
    let log = log_text(&client, again.id).await;
    assert_eq!(again.status, BuildStatus::Ready, "{:?}\n{log}", again.error);
    assert!(log.contains("image taken from the cache"), "{log}");
    assert!(!log.contains("pulling the image"), "{log}");
    assert_eq!(again.cached_steps, 1, "{:?}", again.steps);

    // ---- without credentials the registry refuses, and the build fails saying so
    let refused = client
        .create_build(&image_build("busy-nocreds", gzip.clone(), "true", false))
        .await
        .unwrap();
    let refused = wait_ended(&client, refused.id).await;
    assert_eq!(refused.status, BuildStatus::Failed);
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("needs credentials"),
        "{:?}",
        refused.error
    );

    // ---- a Dockerfile from the image with zstd layers, through the CLI
    let docker = work.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("Dockerfile"),
        format!(
            "FROM {}/demo/busy:zstd\nENV STAGE=docker\nRUN echo \"$STAGE $GREETING\" > /opt/app/stage.txt\n",
            registry.authority()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nestbox"))
        .args(["template", "build"])
        .arg(docker.join("Dockerfile"))
        .args(["--name", "busy-zstd"])
        .env("NESTBOX_URL", &nb.url)
        .env("NESTBOX_API_KEY", &nb.api_key)
        .env("NESTBOX_REGISTRY_USERNAME", "user")
        .env("NESTBOX_REGISTRY_PASSWORD", "pass")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("pulling the image"), "{text}");
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("busy-zstd".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    assert_eq!(
        sh_ok(&client, sb, "cat /opt/app/stage.txt; cat /tmp/entry.log; test ! -e /opt/app/remove-me.txt && echo gone").await,
        "docker hello-from-oci\nhello-from-oci from /opt/app as app\ngone\n"
    );
    client.destroy_sandbox(sb).await.unwrap();
    eprintln!("--- warnings and errors logged ---\n{}", nb.log_problems());
}
