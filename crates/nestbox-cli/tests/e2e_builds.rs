//! Template builds with real VMs, through the CLI (`nestbox template build`) and the API:
//! a recipe with every kind of step (its apt and pip packages served by a package host
//! on a test internet) becomes a snapshot template whose sandboxes start with its server
//! already answering; a rebuild after changing the last step takes the rest from the step
//! cache; a failing step fails the build with its output and leaves nothing running; a
//! cancel stops a build; a Dockerfile builds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Internet, Nestbox, Served, eventually, sh_ok};
use nestbox_client::Client;
use nestbox_types::api::{
    BuildStep, CreateBuildRequest, CreateSandboxRequest, Recipe, SandboxListQuery,
};
use nestbox_types::{BuildId, BuildStatus, ErrorCode, SandboxStatus};
use sha2::{Digest, Sha256};

/// A package host: a Debian repository with one package and a Python package index with
/// one wheel, served over HTTP from inside the test internet.
struct PackageHost {
    _server: Served,
    _dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PackageHost {
    fn start(net: &Internet) -> PackageHost {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // The Debian package: one file, and a flat repository (`deb [trusted=yes] URL ./`).
        let pkg = root.join("pkg");
        std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(pkg.join("usr/share/nbx-hello")).unwrap();
        std::fs::write(
            pkg.join("DEBIAN/control"),
            "Package: nbx-hello\nVersion: 1.0\nArchitecture: all\n\
             Maintainer: Nestbox tests <tests@example.com>\nDescription: a test package\n",
        )
        .unwrap();
        std::fs::write(
            pkg.join("usr/share/nbx-hello/hello.txt"),
            "installed by apt\n",
        )
        .unwrap();
        let debian = root.join("debian");
        std::fs::create_dir_all(&debian).unwrap();
        let deb = debian.join("nbx-hello_1.0_all.deb");
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&pkg)
            .arg(&deb));
        let bytes = std::fs::read(&deb).unwrap();
        let control = std::fs::read_to_string(pkg.join("DEBIAN/control")).unwrap();
        std::fs::write(
            debian.join("Packages"),
            format!(
                "{control}Filename: ./nbx-hello_1.0_all.deb\nSize: {}\nSHA256: {}\n\n",
                bytes.len(),
                hex::encode(Sha256::digest(&bytes))
            ),
        )
        .unwrap();
        // The wheel, and a simple index (PEP 503) listing it.
        let simple = root.join("simple/nbx-hello-py");
        std::fs::create_dir_all(&simple).unwrap();
        run(Command::new("python3")
            .arg("-c")
            .arg(WHEEL_SCRIPT)
            .arg(&simple));
        std::fs::write(
            simple.join("index.html"),
            "<html><body><a href=\"nbx_hello_py-1.0-py3-none-any.whl\">nbx_hello_py-1.0-py3-none-any.whl</a></body></html>\n",
        )
        .unwrap();
        let server = net.serve_dir(root, 8081);
        PackageHost {
            _server: server,
            _dir: dir,
        }
    }
}

/// Writes a pure-Python wheel `nbx_hello_py` 1.0 into the directory given.
const WHEEL_SCRIPT: &str = r#"
import base64, hashlib, sys, zipfile
files = {
    "nbx_hello_py/__init__.py": b"GREETING = 'installed by pip'\n",
    "nbx_hello_py-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: nbx-hello-py\nVersion: 1.0\n",
    "nbx_hello_py-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: nestbox-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = ""
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record += f"{name},sha256={digest},{len(data)}\n"
record += "nbx_hello_py-1.0.dist-info/RECORD,,\n"
with zipfile.ZipFile(sys.argv[1] + "/nbx_hello_py-1.0-py3-none-any.whl", "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
    z.writestr("nbx_hello_py-1.0.dist-info/RECORD", record)
"#;

/// Runs `nestbox ARGS` and returns (success, stdout + stderr).
fn cli(nb: &Nestbox, args: &[&str]) -> (bool, String) {
    let out = nb.cli(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `nestbox template build ARGS` and returns (success, stdout + stderr).
fn cli_build(nb: &Nestbox, args: &[&str]) -> (bool, String) {
    let mut all = vec!["template", "build"];
    all.extend_from_slice(args);
    cli(nb, &all)
}

/// A build of `name` whose steps are these shell command lines.
fn shell_build(name: &str, commands: &[&str], no_cache: bool) -> CreateBuildRequest {
    CreateBuildRequest {
        name: name.into(),
        recipe: Recipe {
            steps: commands
                .iter()
                .map(|c| BuildStep::Run {
                    command: (*c).into(),
                    user: None,
                    cwd: None,
                })
                .collect(),
            ..Default::default()
        },
        timeout_sec: None,
        no_cache,
        registry_auth: None,
        tags: Vec::new(),
    }
}

/// The team's newest build.
async fn newest_build(client: &Client) -> nestbox_types::api::Build {
    client.list_builds().await.unwrap().remove(0)
}

async fn wait_ended(client: &Client, id: BuildId) -> nestbox_types::api::Build {
    eventually(Duration::from_secs(300), "the build to end", || async {
        let b = client.get_build(id).await.unwrap();
        b.status.is_final().then_some(b)
    })
    .await
}

/// The build's log as far as it goes now.
async fn whole_log(client: &Client, id: BuildId) -> Vec<nestbox_types::api::BuildLogEntry> {
    let mut all = Vec::new();
    let mut offset = 0;
    loop {
        let page = client.build_logs(id, offset).await.unwrap();
        let caught_up = page.items.is_empty();
        all.extend(page.items);
        offset = page.next;
        // Ended, or caught up with a build still running.
        if page.done || caught_up {
            return all;
        }
    }
}

/// Sandboxes a build left running (build sandboxes carry `nestbox.build`).
async fn live_build_sandboxes(client: &Client) -> usize {
    let page = client
        .list_sandboxes(&SandboxListQuery::default())
        .await
        .unwrap();
    page.items
        .iter()
        .filter(|s| s.metadata.contains_key("nestbox.build"))
        .filter(|s| s.status != SandboxStatus::Stopped)
        .count()
}

const RECIPE: &str = r#"
name = "built-web"
base = "python"

[[step]]
run = "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*; echo 'deb [trusted=yes] http://@HOST@:8081/debian ./' > /etc/apt/sources.list.d/local.list"

[[step]]
env = { PIP_INDEX_URL = "http://@HOST@:8081/simple", PIP_TRUSTED_HOST = "@HOST@", PORT = "8000", GREETING = "hello from the recipe" }

[[step]]
apt = ["nbx-hello"]

[[step]]
pip = ["nbx-hello-py"]

[[step]]
copy = "site"
to = "/srv/site"
user = "user"

[[step]]
copy = "motd.txt"
to = "/etc/nbx"

[[step]]
workdir = "/srv/site"

[[step]]
run = "id -un > who.txt; pwd >> who.txt; echo \"$GREETING\" >> who.txt"
user = "user"
cwd = "/home/user"

[[step]]
user = "user"

[[step]]
run = "id -un > /tmp/last-step.txt; echo last step ran"

[start]
command = "python3 -m http.server $PORT"
ready = "python3 -c 'import urllib.request; urllib.request.urlopen(\"http://127.0.0.1:8000/\")'"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn recipes_build_templates_with_real_vms() {
    let net = Internet::new("198.18.0.0/25", &[], &[]);
    let _packages = PackageHost::start(&net);
    let nb = Nestbox::up_env(&[("NESTBOX_DNS", &net.dns())]);
    let client = nb.client();

    // ---- a recipe with every kind of step, through the CLI
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(work.path().join("site/css")).unwrap();
    std::fs::write(work.path().join("site/index.html"), "<h1>built</h1>\n").unwrap();
    std::fs::write(work.path().join("site/css/a.css"), "h1{}\n").unwrap();
    std::fs::write(work.path().join("motd.txt"), "copied file\n").unwrap();
    let recipe_file = work.path().join("recipe.toml");
    std::fs::write(&recipe_file, RECIPE.replace("@HOST@", &net.ip(2))).unwrap();
    let file = recipe_file.to_str().unwrap();

    let began = Instant::now();
    let (ok, out) = cli_build(&nb, &[file]);
    let cold = began.elapsed();
    assert!(ok, "{out}");
    assert!(out.contains("uploading"), "{out}");
    assert!(out.contains("last step ran"), "{out}");
    assert!(out.contains("template `built-web` built"), "{out}");
    let first = newest_build(&client).await;
    assert_eq!(first.status, BuildStatus::Ready);
    assert_eq!(first.cached_steps, 0);
    assert!(
        first.steps.iter().all(|s| s.status == "done"),
        "{:?}",
        first.steps
    );
    assert_eq!(first.steps.len(), 11, "ten steps and the start command");
    assert_eq!(live_build_sandboxes(&client).await, 0);

    // A sandbox from it starts with the server answering and sees every step's work.
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("built-web".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let page = sh_ok(
        &client,
        sb,
        "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:8000/index.html\").read().decode())'",
    )
    .await;
    assert_eq!(page.trim(), "<h1>built</h1>");
    assert_eq!(
        sh_ok(&client, sb, "cat /usr/share/nbx-hello/hello.txt")
            .await
            .trim(),
        "installed by apt"
    );
    assert_eq!(
        sh_ok(
            &client,
            sb,
            "python3 -c 'import nbx_hello_py; print(nbx_hello_py.GREETING)'"
        )
        .await
        .trim(),
        "installed by pip"
    );
    assert_eq!(
        sh_ok(&client, sb, "cat /home/user/who.txt").await,
        "user\n/home/user\nhello from the recipe\n"
    );
    assert_eq!(
        sh_ok(&client, sb, "cat /tmp/last-step.txt").await.trim(),
        "user",
        "the user step sets the user of the steps after it"
    );
    assert_eq!(
        sh_ok(
            &client,
            sb,
            "stat -c %U /srv/site/index.html /srv/site/css/a.css; cat /etc/nbx/motd.txt"
        )
        .await,
        "user\nuser\ncopied file\n"
    );
    // The recipe's environment is the template's; the start command runs as its user, and
    // so do commands that name none, in its last directory (as a container's do).
    assert_eq!(
        sh_ok(&client, sb, "echo $GREETING:$PORT").await.trim(),
        "hello from the recipe:8000"
    );
    assert_eq!(sh_ok(&client, sb, "id -un; pwd").await, "user\n/srv/site\n");
    let procs = client.list_processes(sb).await.unwrap();
    assert!(
        procs.iter().any(|p| p.tag.as_deref() == Some("start")),
        "{procs:?}"
    );
    assert_eq!(
        sh_ok(
            &client,
            sb,
            "for p in /proc/[0-9]*; do grep -qs 'http[.]server' $p/cmdline && stat -c %U $p; done | sort -u",
        )
        .await
        .trim(),
        "user"
    );

    // ---- a rebuild after changing the last step takes the others from the cache; built
    // as `built-web:v2` (the CLI's `NAME:TAG`), it leaves `built-web` and its sandbox be
    std::fs::write(
        &recipe_file,
        RECIPE
            .replace("@HOST@", &net.ip(2))
            .replace("echo last step ran", "echo last step changed"),
    )
    .unwrap();
    let began = Instant::now();
    let (ok, out) = cli_build(&nb, &[file, "--name", "built-web:v2"]);
    let cached = began.elapsed();
    assert!(ok, "{out}");
    assert!(
        out.contains("unchanged"),
        "archives are not sent twice: {out}"
    );
    assert!(out.contains("step 9: USER user — cached"), "{out}");
    assert!(out.contains("last step changed"), "{out}");
    assert!(!out.contains("Unpacking nbx-hello"), "apt ran again: {out}");
    let second = newest_build(&client).await;
    assert_eq!(second.cached_steps, 9, "{:?}", second.steps);
    assert_eq!(second.steps[9].status, "done");
    assert_eq!(second.tags, ["v2"]);
    let last_step = |sb| {
        let client = client.clone();
        async move { sh_ok(&client, sb, "cat /tmp/last-step.txt; echo ran").await }
    };
    let tagged = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("built-web:v2".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    assert_eq!(sh_ok(&client, tagged, "id -un").await.trim(), "user");
    // The tag becomes the name (the CLI's `template tag`): new sandboxes get the rebuild,
    // the one running from the first build carries on.
    let (ok, out) = cli(
        &nb,
        &["template", "tag", "built-web", "--from", "v2", "default"],
    );
    assert!(ok && out.contains("\"default\""), "{out}");
    let renamed = client.template_tags("built-web").await.unwrap();
    assert!(
        renamed
            .iter()
            .all(|t| t.template_id == second.template_id.unwrap()),
        "{renamed:?}"
    );
    assert_eq!(
        last_step(sb).await,
        "user\nran\n",
        "the first build's sandbox runs on"
    );
    client.destroy_sandbox(sb).await.unwrap();
    client.destroy_sandbox(tagged).await.unwrap();
    eprintln!(
        "cold build {:.1} s, rebuild with 9 of 10 steps cached {:.1} s",
        cold.as_secs_f64(),
        cached.as_secs_f64()
    );

    // ---- a failing step fails the build with its output and leaves nothing running
    let failing = client
        .create_build(&shell_build(
            "never-built",
            &["echo before", "echo going wrong >&2; exit 7", "echo never"],
            true,
        ))
        .await
        .unwrap();
    let failed = wait_ended(&client, failing.id).await;
    assert_eq!(failed.status, BuildStatus::Failed);
    let error = failed.error.clone().unwrap();
    assert!(
        error.contains("step 2") && error.contains("exit code 7"),
        "{error}"
    );
    assert_eq!(failed.steps[1].status, "failed");
    assert_eq!(failed.steps[1].exit_code, Some(7));
    assert_eq!(failed.steps[2].status, "skipped");
    let log = whole_log(&client, failing.id).await;
    assert!(
        log.iter()
            .any(|l| l.step == 2 && l.stream == "stderr" && l.text == "going wrong"),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.text == "never"));
    assert!(
        client
            .list_snapshots()
            .await
            .unwrap()
            .iter()
            .all(|t| t.name != "never-built")
    );
    assert_eq!(live_build_sandboxes(&client).await, 0);

    // ---- cancel
    let long = client
        .create_build(&shell_build(
            "cancelled",
            &["echo sleeping; sleep 600"],
            false,
        ))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(120),
        "the long step to start",
        || async {
            let log = whole_log(&client, long.id).await;
            log.iter().any(|l| l.text == "sleeping").then_some(())
        },
    )
    .await;
    let asked = Instant::now();
    client.cancel_build(long.id).await.unwrap();
    let cancelled = wait_ended(&client, long.id).await;
    assert_eq!(cancelled.status, BuildStatus::Cancelled);
    assert_eq!(cancelled.steps[0].status, "cancelled");
    eprintln!("a cancel took {:.1} s", asked.elapsed().as_secs_f64());
    assert_eq!(live_build_sandboxes(&client).await, 0);
    let again = client.cancel_build(long.id).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::Conflict));
    assert!(
        client
            .list_snapshots()
            .await
            .unwrap()
            .iter()
            .all(|t| t.name != "cancelled")
    );

    // ---- a Dockerfile builds
    let docker = work.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(docker.join("app.py"), "print('from the dockerfile')\n").unwrap();
    std::fs::write(
        docker.join("Dockerfile"),
        "FROM python:3.11-slim\nARG FLAVOUR=plain\nENV APP_HOME=/opt/app\n\
         WORKDIR $APP_HOME\nCOPY app.py .\nRUN echo \"$FLAVOUR\" > flavour.txt\n\
         EXPOSE 9000\nCMD [\"python3\", \"-m\", \"http.server\", \"9000\"]\n\
         HEALTHCHECK CMD python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/')\"\n",
    )
    .unwrap();
    let (ok, out) = cli_build(
        &nb,
        &[
            docker.join("Dockerfile").to_str().unwrap(),
            "--name",
            "from-dockerfile",
            "--build-arg",
            "FLAVOUR=spicy",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("EXPOSE has no effect"), "{out}");
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("from-dockerfile".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    assert_eq!(
        sh_ok(&client, sb, "cd $APP_HOME && python3 app.py && cat flavour.txt && python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9000/app.py').status)\"").await,
        "from the dockerfile\nspicy\n200\n"
    );
    client.destroy_sandbox(sb).await.unwrap();

    // ---- what is refused before a build starts
    let refused = |recipe: serde_json::Value| {
        let client = client.clone();
        async move {
            let req: CreateBuildRequest = serde_json::from_value(serde_json::json!({
                "name": "refused", "recipe": recipe
            }))
            .unwrap();
            client.create_build(&req).await.unwrap_err()
        }
    };
    let e = refused(serde_json::json!({"steps": [{"type": "run", "command": "true"}, {"type": "env", "vars": {"9X": "y"}}]})).await;
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest));
    assert!(e.to_string().contains("step 2"), "{e}");
    let e = refused(
        serde_json::json!({"steps": [{"type": "copy", "archive": "a".repeat(64), "dest": "/x"}]}),
    )
    .await;
    assert!(e.to_string().contains("upload these archives first"), "{e}");
    let e = refused(serde_json::json!({"base": "no-such-base"})).await;
    assert_eq!(e.code(), Some(ErrorCode::TemplateNotFound));
    assert!(
        client
            .list_builds()
            .await
            .unwrap()
            .iter()
            .all(|b| b.name != "refused")
    );
    eprintln!("--- warnings and errors logged ---\n{}", nb.log_problems());
}
